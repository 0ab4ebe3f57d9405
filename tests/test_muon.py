"""muon_jax against an independent float64 numpy reference, plus composition with optax and flax."""
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_jax
from conftest import ns_reference  # float64 numpy, Moonlight's coefficients written out


# ---------------------------------------------------------------- float64 numpy reference (Moonlight)
def muon_ref_update(g, buf, w, *, lr, mu, nesterov, wd):
    buf = mu * buf + g
    m = g + mu * buf if nesterov else buf
    flat = m.reshape(-1, *m.shape[-2:])
    o = np.stack([ns_reference(x) for x in flat]).reshape(m.shape)
    scale = 0.2 * np.sqrt(max(m.shape[-2:]))
    return -lr * (scale * o + wd * w), buf


def adamw_ref_update(g, m, v, w, t, *, lr, b1=0.9, b2=0.95, eps=1e-8, wd):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
    return -lr * (mhat / (np.sqrt(vhat) + eps) + wd * w), m, v


def make_params(key):
    shapes = {
        "embed": (50, 16), "attn": {"wq": (16, 24)}, "stack": (3, 16, 40), "experts": (2, 4, 12, 8),
        "norm": (16,), "lm_head": (16, 50), "layers": {"attn_norm": (3, 16), "q_bias": (3, 24)},
    }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, s) * 0.5 for k, s in zip(keys, leaves)])


@pytest.mark.parametrize("nesterov", [True, False])
def test_trajectory_matches_float64_reference(nesterov):
    lr, wd, steps = 0.02, 0.1, 4
    params = make_params(jax.random.key(0))
    tx = muon_jax.muon(lr, nesterov=nesterov, weight_decay=wd, ns_dtype=jnp.float32)
    state = tx.init(params)
    update = jax.jit(tx.update)
    labels = muon_jax.default_labels(params)
    assert labels == {"embed": "adam", "attn": {"wq": "muon"}, "stack": "muon", "experts": "muon",
                      "norm": "adam", "lm_head": "adam", "layers": {"attn_norm": "adam", "q_bias": "adam"}}

    ref_w = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    ref_s = jax.tree.map(lambda p: [np.zeros_like(p), np.zeros_like(p)], ref_w)
    for t in range(1, steps + 1):
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(t), p.shape), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)

        def ref_step(label, g, w, s):
            g = np.asarray(g, np.float64)
            if label == "muon":
                u, s[0] = muon_ref_update(g, s[0], w, lr=lr, mu=0.95, nesterov=nesterov, wd=wd)
            else:
                u, s[0], s[1] = adamw_ref_update(g, s[0], s[1], w, t, lr=lr, wd=wd)
            return u
        ref_u = jax.tree.map(ref_step, labels, grads, ref_w, ref_s)
        ref_w = jax.tree.map(lambda w, u: w + u, ref_w, ref_u)
        for path, u, r in zip(jax.tree_util.tree_leaves_with_path(updates),
                              jax.tree.leaves(updates), jax.tree.leaves(ref_u)):
            rel = np.linalg.norm(np.asarray(u, np.float64) - r) / np.linalg.norm(r)
            assert rel <= 1e-4, (t, jax.tree_util.keystr(path[0]), rel)
    for p, w in zip(jax.tree.leaves(params), jax.tree.leaves(ref_w)):
        np.testing.assert_allclose(np.asarray(p), w, rtol=1e-4, atol=1e-5)


def test_momentum_buffer_is_moonlight_heavy_ball():
    tx = muon_jax.scale_by_momentum(0.9, nesterov=True)
    g1, g2 = jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0])
    state = tx.init(g1)
    out1, state = tx.update(g1, state)
    np.testing.assert_allclose(state.mu, g1)
    np.testing.assert_allclose(out1, g1 + 0.9 * g1)
    out2, state = tx.update(g2, state)
    np.testing.assert_allclose(state.mu, 0.9 * g1 + g2, rtol=1e-6)
    np.testing.assert_allclose(out2, g2 + 0.9 * (0.9 * g1 + g2), rtol=1e-6)
    out, _ = muon_jax.scale_by_momentum(0.9, nesterov=False).update(g2, state)
    np.testing.assert_allclose(out, 0.9 * state.mu + g2, rtol=1e-6)


# ----------------------------------------------------------------------------------- Lemma 1 (RMS)
@pytest.mark.parametrize("shape", [(512, 128), (128, 512), (256, 256)])
def test_update_rms_lemma1(shape):
    g = {"w": jax.random.normal(jax.random.key(1), shape)}
    params = {"w": jnp.zeros(shape)}

    def rms(lr_scale):
        tx = muon_jax.muon(1.0, weight_decay=0.0, lr_scale=lr_scale)
        u, _ = tx.update(g, tx.init(params), params)
        return float(jnp.sqrt(jnp.mean(jnp.square(u["w"]))))

    assert abs(rms("moonlight") - 0.2) <= 0.15 * 0.2
    expected = np.sqrt(1 / max(shape))
    assert abs(rms("none") - expected) <= 0.15 * expected


def test_scale_by_shape_rules():
    x = {"w": jnp.ones((2, 8, 32))}
    for rule, factor in [("moonlight", 0.2 * np.sqrt(32)), ("spectral", np.sqrt(32 / 8)), ("none", 1.0),
                         (lambda s: s[0] * 1000 + s[1], 8032.0)]:
        u, _ = muon_jax.scale_by_shape(rule).update(x, None)
        np.testing.assert_allclose(u["w"], factor, rtol=1e-6)
    u, _ = muon_jax.scale_by_shape("spectral").update({"w": jnp.ones((32, 8))}, None)
    np.testing.assert_allclose(u["w"], 1.0)  # fan_out < fan_in: never shrink


# ------------------------------------------------------------------------------------- Newton–Schulz
def singular_values(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def test_newton_schulz_singular_value_bands():
    mats = jax.random.normal(jax.random.key(2), (6, 48, 96))
    sv = {}
    for name in ["moonlight", "polar_express"]:
        out = muon_jax.newton_schulz(mats, coeffs=name, dtype=jnp.float32)
        sv[name] = singular_values(out)
        ref = np.stack([ns_reference(np.asarray(m, np.float64)) for m in mats]) if name == "moonlight" else None
        if ref is not None:
            np.testing.assert_allclose(out, ref, atol=1e-5)
    # Moonlight's quintic deliberately stops short of 1: its fixed band is about [0.68, 1.13].
    assert 0.6 < sv["moonlight"].min() and sv["moonlight"].max() < 1.25
    assert 0.8 < sv["polar_express"].min() and sv["polar_express"].max() < 1.2
    err = {k: np.abs(v - 1).mean() for k, v in sv.items()}
    assert err["polar_express"] < err["moonlight"], err


def test_newton_schulz_tall_is_transpose_of_wide_and_zero_is_zero():
    x = jax.random.normal(jax.random.key(3), (2, 40, 12))
    tall = muon_jax.newton_schulz(x, dtype=jnp.float32)
    wide = muon_jax.newton_schulz(jnp.swapaxes(x, -1, -2), dtype=jnp.float32)
    np.testing.assert_allclose(tall, jnp.swapaxes(wide, -1, -2), atol=1e-6)
    np.testing.assert_array_equal(muon_jax.newton_schulz(jnp.zeros((4, 6))), 0.0)


def test_newton_schulz_bf16_close_to_f32():
    x = jax.random.normal(jax.random.key(4), (4, 64, 128))
    f32 = muon_jax.newton_schulz(x, dtype=jnp.float32)
    bf16 = muon_jax.newton_schulz(x, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32  # iteration dtype is internal; the output keeps the input dtype
    # bf16 keeps 8 mantissa bits (eps 2^-8); the quintic is not contractive near σ≈1 (it oscillates in its
    # band), so rounding moves singular values by a few percent while the singular vectors stay put.
    rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
    cos = float(jnp.vdot(bf16, f32) / (jnp.linalg.norm(bf16) * jnp.linalg.norm(f32)))
    assert rel < 0.1 and cos > 0.995, (rel, cos)
    sv = singular_values(bf16[0])
    assert 0.6 < sv.min() and sv.max() < 1.25


def test_newton_schulz_custom_coeffs():
    x = jax.random.normal(jax.random.key(5), (16, 32))
    one = muon_jax.newton_schulz(x, coeffs=tuple(muon_jax.MOONLIGHT_COEFFS), dtype=jnp.float32)
    np.testing.assert_allclose(one, muon_jax.newton_schulz(x, dtype=jnp.float32), atol=1e-6)
    # A per-step sequence shorter than `steps` repeats its last triple.
    short = muon_jax.newton_schulz(x, steps=7, coeffs=muon_jax.POLAR_EXPRESS_COEFFS[:2], dtype=jnp.float32)
    full = muon_jax.newton_schulz(
        x, steps=7, dtype=jnp.float32,
        coeffs=muon_jax.POLAR_EXPRESS_COEFFS[:2] + (muon_jax.POLAR_EXPRESS_COEFFS[1],) * 5)
    np.testing.assert_allclose(short, full, atol=1e-6)


def test_newton_schulz_traces_once_per_shape():
    counted = jax.jit(chex.assert_max_traces(
        lambda x: muon_jax.newton_schulz.__wrapped__(x, steps=5, coeffs="moonlight", eps=1e-7,
                                                     dtype=jnp.float32), n=2))
    for _ in range(3):
        counted(jnp.ones((8, 16)))
        counted(jnp.ones((3, 16, 8)))
    with pytest.raises(AssertionError):
        counted(jnp.ones((5, 5)))


def test_update_traces_once_and_state_keeps_shape_and_dtype():
    params = make_params(jax.random.key(6))
    tx = muon_jax.muon(0.01, mu_dtype=jnp.bfloat16)
    state = tx.init(params)
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    for t in range(3):
        new_state = update(jax.tree.map(jnp.ones_like, params), state, params)[1]
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        state = new_state


# ------------------------------------------------------------------------------------ composition
def small_problem():
    params = {"w": jax.random.normal(jax.random.key(7), (2, 12, 20)), "b": jnp.zeros(20)}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(8), p.shape), params)
    return params, grads


def test_inject_hyperparams_learning_rate_changes_step():
    params, grads = small_problem()
    tx = optax.inject_hyperparams(muon_jax.muon)(learning_rate=0.1, weight_decay=0.0)
    state = tx.init(params)
    u1, _ = jax.jit(tx.update)(grads, state, params)
    plain, _ = muon_jax.muon(0.1, weight_decay=0.0).update(grads, muon_jax.muon(0.1).init(params), params)
    chex.assert_trees_all_close(u1, plain, rtol=2e-3, atol=1e-6)
    state.hyperparams["learning_rate"] = jnp.asarray(0.2)
    u2, _ = jax.jit(tx.update)(grads, state, params)
    chex.assert_trees_all_close(u2["w"], 2 * u1["w"], rtol=1e-5)


def test_schedule_multisteps_and_clip_chain():
    params, grads = small_problem()
    sched = optax.linear_schedule(0.1, 0.0, 10)
    tx, unit = muon_jax.muon(sched, ns_dtype=jnp.float32), muon_jax.muon(1.0, ns_dtype=jnp.float32)
    s_sched, s_unit = tx.init(params), unit.init(params)
    for step in range(4):  # the update is linear in the LR, so at step t it is sched(t) × the LR-1 update
        u, s_sched = tx.update(grads, s_sched, params)
        u_unit, s_unit = unit.update(grads, s_unit, params)
        chex.assert_trees_all_close(u, jax.tree.map(lambda x: sched(step) * x, u_unit), rtol=1e-5, atol=1e-8)

    acc = optax.MultiSteps(muon_jax.muon(0.1, ns_dtype=jnp.float32), every_k_schedule=2)
    st = acc.init(params)
    g2 = jax.tree.map(lambda g: -0.5 * g, grads)
    u_a, st = acc.update(grads, st, params)
    chex.assert_trees_all_close(u_a, jax.tree.map(jnp.zeros_like, u_a))
    u_b, st = acc.update(g2, st, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, grads, g2)
    expect, _ = muon_jax.muon(0.1, ns_dtype=jnp.float32).update(mean, muon_jax.muon(0.1, ns_dtype=jnp.float32).init(params), params)
    chex.assert_trees_all_close(u_b, expect, rtol=1e-3, atol=1e-6)

    clipped = optax.chain(optax.clip_by_global_norm(1.0), muon_jax.muon(0.1, weight_decay=0.0, ns_dtype=jnp.float32))
    u_c, _ = clipped.update(grads, clipped.init(params), params)
    small = jax.tree.map(lambda g: g / optax.global_norm(grads), grads)
    expect, _ = muon_jax.muon(0.1, weight_decay=0.0, ns_dtype=jnp.float32).update(small, muon_jax.muon(0.1, ns_dtype=jnp.float32).init(params), params)
    chex.assert_trees_all_close(u_c, expect, rtol=1e-3, atol=1e-6)


def test_bf16_params_stay_bf16():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), small_problem()[0])
    grads = jax.tree.map(jnp.ones_like, params)
    tx = muon_jax.muon(0.1)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    assert optax.apply_updates(params, u)["w"].dtype == jnp.bfloat16


def test_matrix_axes_pytree():
    x = jax.random.normal(jax.random.key(9), (12, 3, 20))  # matrix on axes (0, 2), batch on axis 1
    tx = muon_jax.orthogonalize(dtype=jnp.float32, matrix_axes={"w": (0, 2)})
    u, _ = tx.update({"w": x}, None)
    expect = jnp.moveaxis(muon_jax.newton_schulz(jnp.moveaxis(x, 1, 0), dtype=jnp.float32), 0, 1)
    np.testing.assert_allclose(u["w"], expect, atol=1e-6)
    full = muon_jax.muon(1.0, weight_decay=0.0, ns_dtype=jnp.float32, matrix_axes={"w": (0, 2), "b": None})
    params = {"w": x, "b": jnp.zeros(3)}
    u, _ = full.update(params, full.init(params), params)
    # Nesterov on step 1 feeds (1 + μ)·G, which NS normalises away; scale uses (A, B) = (12, 20).
    np.testing.assert_allclose(-u["w"], 0.2 * np.sqrt(20) * expect, rtol=1e-4, atol=1e-6)


def test_flax_nnx_optimizer():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(20, 8, rngs=rngs)
            self.hidden = nnx.Linear(8, 16, rngs=rngs)
            self.lm_head = nnx.Linear(16, 20, use_bias=False, rngs=rngs)

        def __call__(self, t):
            return self.lm_head(jax.nn.relu(self.hidden(self.embed(t))))

    model = Tiny(nnx.Rngs(0))
    opt = nnx.Optimizer(model, muon_jax.muon(0.05), wrt=nnx.Param)
    tokens = jnp.arange(12) % 20

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(tokens), (tokens + 1) % 20).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    labels = muon_jax.default_labels(nnx.state(model, nnx.Param))
    flat = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_leaves_with_path(labels)}
    assert {k for k, v in flat.items() if v == "muon"} == {k for k in flat if "hidden" in k and "kernel" in k}


# ----------------------------------------------------------------------------------------- errors
def test_bad_input_errors():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    with pytest.raises(ValueError, match="polar_express"):
        muon_jax.muon(0.1, ns_coeffs="nope")
    with pytest.raises(ValueError, match="spectral"):
        muon_jax.muon(0.1, lr_scale="nope")
    with pytest.raises(ValueError, match=r"\['b'\].*ndim < 2"):
        muon_jax.muon(0.1, labels={"w": "muon", "b": "muon"}).init(params)
    with pytest.raises(ValueError, match="'sgd'.*not one of"):
        muon_jax.muon(0.1, labels={"w": "sgd", "b": "adam"}).init(params)
    with pytest.raises(ValueError, match="at least 2 axes"):
        muon_jax.newton_schulz(jnp.ones(3))


def test_imports_without_trainer_dependencies():
    code = ("import sys, muon_jax; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'flax', 'grain', 'orbax', 'torch', 'transformers', 'yaml'}); print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ multi-axis matrix views
def views_reference(g, rows, cols):
    """-0.2·√max(A, B)·NS of every matrix of ``g`` seen through (rows, cols), in float64 numpy: transposed to
    batch + rows + cols, reshaped to [..., A, B], Moonlight NS per matrix, and back."""
    batch = [i for i in range(g.ndim) if i not in rows + cols]
    order = batch + list(rows) + list(cols)
    a, b = np.prod([g.shape[i] for i in rows]), np.prod([g.shape[i] for i in cols])
    moved = np.transpose(np.asarray(g, np.float64), order)
    mats = moved.reshape(-1, a, b)
    out = np.stack([ns_reference(m) for m in mats]).reshape(moved.shape)
    return -0.2 * np.sqrt(max(a, b)) * np.transpose(out, np.argsort(order))


@pytest.mark.parametrize("name, shape, axes, rows, cols", [
    ("conv", (3, 3, 4, 16), ((0, 1, 2), (3,)), (0, 1, 2), (3,)),            # HWIO kernel: one [36, 16]
    ("conv_mixed", (3, 3, 4, 16), ((0, 1, 2), 3), (0, 1, 2), (3,)),         # an int for one side
    ("conv_optax", (3, 3, 4, 16), optax.contrib.MuonDimensionNumbers((0, 1, 2), 3), (0, 1, 2), (3,)),
    ("wide_cols", (16, 3, 3, 4), ([0], [1, 2, 3]), (0,), (1, 2, 3)),        # lists: [16, 36]
    ("batch_between", (4, 2, 3, 5), ((0, 2), (-1,)), (0, 2), (3,)),          # batch axis 1: 2 × [12, 5]
    ("int_pair", (12, 3, 20), (0, 2), (0,), (2,)),                           # today's (row_axis, col_axis)
])
def test_multi_axis_view_update_matches_float64_reference(name, shape, axes, rows, cols):
    g = jax.random.normal(jax.random.key(10), shape)
    params = {name: jnp.zeros(shape), "b": jnp.zeros(shape[-1])}
    tx = muon_jax.muon(1.0, weight_decay=0.0, ns_dtype=jnp.float32, labels={name: "muon", "b": "adam"},
                       matrix_axes={name: axes, "b": None})
    u, _ = jax.jit(tx.update)({name: g, "b": jnp.ones(shape[-1])}, tx.init(params), params)
    # Step 1 with Nesterov feeds (1 + μ)·G, which NS's normalisation removes.
    ref = views_reference(np.asarray(g), rows, cols)
    assert np.linalg.norm(np.asarray(u[name], np.float64) - ref) / np.linalg.norm(ref) <= 1e-4


def test_scale_by_shape_uses_the_merged_sizes():
    x = {"k": jnp.ones((3, 3, 4, 16)), "t": jnp.ones((16, 3, 3, 2))}
    axes = {"k": ((0, 1, 2), (3,)), "t": ((0,), (1, 2, 3))}
    u, _ = muon_jax.scale_by_shape("moonlight", matrix_axes=axes).update(x, None)
    np.testing.assert_allclose(u["k"], 0.2 * np.sqrt(36), rtol=1e-6)
    np.testing.assert_allclose(u["t"], 0.2 * np.sqrt(18), rtol=1e-6)
    u, _ = muon_jax.scale_by_shape("spectral", matrix_axes=axes).update(x, None)
    np.testing.assert_allclose(u["k"], 1.0)                     # 16 / 36 < 1
    np.testing.assert_allclose(u["t"], np.sqrt(18 / 16), rtol=1e-6)


def test_bad_matrix_axes_fail_at_init_naming_the_leaf():
    params = {"k": jnp.ones((3, 3, 4, 8)), "b": jnp.ones(8)}
    labels = {"k": "muon", "b": "adam"}
    cases = [
        (((0, 1, 2), (2,)), r"\['k'\] name an axis twice"),
        (((0, 5), 3), r"\['k'\] names axis 5.*\(3, 3, 4, 8\).*\[-4, 4\)"),
        (((), (3,)), r"\['k'\] leaves the rows empty"),
        ("rows", r"\['k'\] is 'rows'.*MuonDimensionNumbers"),
        (((0, 1.5), 3), r"\['k'\] is .*\(\(0, 1.5\), 3\)"),
    ]
    for axes, message in cases:
        with pytest.raises(ValueError, match=message):
            muon_jax.muon(0.1, labels=labels, matrix_axes={"k": axes, "b": None}).init(params)
    with pytest.raises(ValueError, match=r"matrix_axes tree does not match.*no entry for the parameter at \['k'\]"):
        muon_jax.muon(0.1, labels=labels, matrix_axes={"kernel": None, "b": None}).init(params)
    with pytest.raises(ValueError, match=r"matrix_axes tree does not match.*\['extra'\]"):
        muon_jax.muon(0.1, labels=labels, matrix_axes={"k": None, "b": None, "extra": (0, 1)}).init(params)
    with pytest.raises(ValueError, match=r"one \(rows, cols\) pair, \(\(0, 1, 2\), 3\), for the whole tree"):
        muon_jax.muon(0.1, labels=labels, matrix_axes=((0, 1, 2), 3)).init(params)
    # the same checks in the standalone transforms
    with pytest.raises(ValueError, match=r"\['k'\] name an axis twice"):
        muon_jax.orthogonalize(matrix_axes={"k": ((0, 1), (1, 3))}).init({"k": params["k"]})
    with pytest.raises(ValueError, match=r"\['k'\] names axis 4"):
        muon_jax.scale_by_shape(matrix_axes={"k": (0, 4)}).init({"k": params["k"]})


# ------------------------------------------------------------------------- strict input checks (issue 26)
def test_bad_hyperparameters_fail_with_one_line():
    for lr, message in [(None, "learning_rate=None is not a learning rate"), ("2e-2", "learning_rate='2e-2' is not"),
                        (-0.1, "learning_rate=-0.1 is negative"), (jnp.asarray(-1.0), "is negative")]:
        with pytest.raises(ValueError, match=message):
            muon_jax.muon(lr)
    with pytest.raises(ValueError, match="adam_learning_rate=-0.001 is negative"):
        muon_jax.muon(0.1, adam_learning_rate=-1e-3)
    for mu in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"momentum={mu} is outside \[0, 1\)"):
            muon_jax.muon(0.1, momentum=mu)
    for steps in (0, -2, 2.5):
        with pytest.raises(ValueError, match=rf"ns_steps={steps} must be an integer of at least 1"):
            muon_jax.muon(0.1, ns_steps=steps)
    muon_jax.muon(0.0, momentum=0.0, ns_steps=1)  # the edges that are allowed
    # under inject_hyperparams the values arrive as arrays: still checked at init
    with pytest.raises(ValueError, match="is negative"):
        optax.inject_hyperparams(muon_jax.muon)(learning_rate=-0.1).init({"w": jnp.ones((4, 4))})


def test_labels_and_gradients_that_do_not_fit_the_params():
    params = {"w": jnp.ones((4, 8)), "b": jnp.ones(8), "z": jnp.ones((0, 8))}
    labels = {"w": "muon", "b": "adam", "z": "adam"}
    with pytest.raises(ValueError, match=r"labels tree does not match.*no entry for the parameter at \['w'\]"):
        muon_jax.muon(0.1, labels={"v": "muon", "b": "adam", "z": "adam"}).init(params)
    with pytest.raises(ValueError, match=r"\['z'\] has zero size.*Label it 'adam'"):
        muon_jax.muon(0.1, labels={**labels, "z": "muon"}).init(params)
    tx = muon_jax.muon(0.1, labels=labels)
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"gradient at \['w'\] has shape \(8, 4\) but its parameter has shape \(4, 8\)"):
        tx.update({**params, "w": jnp.ones((8, 4))}, state, params)
    with pytest.raises(ValueError, match=r"gradients tree does not match.*\['z'\]"):
        tx.update({"w": params["w"], "b": params["b"]}, state, params)
    float0 = np.zeros((4, 8), jax.dtypes.float0)
    with pytest.raises(ValueError, match=r"gradient at \['w'\] is float0.*zeros_like"):
        tx.update({**params, "w": float0}, state, params)


def test_callable_labels_under_inject_hyperparams():
    params, grads = small_problem()
    pick = lambda p: jax.tree.map(lambda x: "muon" if x.ndim > 1 else "adam", p)  # noqa: E731
    with pytest.raises(ValueError, match=r"called as a schedule; pass static_args=\('labels',\)"):
        optax.inject_hyperparams(muon_jax.muon)(learning_rate=0.1, labels=pick).init(params)
    with pytest.raises(ValueError, match=r"called as a schedule; pass static_args=\('labels',\)"):  # one leaf too
        optax.inject_hyperparams(muon_jax.muon)(learning_rate=0.1, labels=pick).init({"w": params["w"]})
    tx = optax.inject_hyperparams(muon_jax.muon, static_args=("labels",))(learning_rate=0.1, labels=pick)
    u, _ = tx.update(grads, tx.init(params), params)
    plain = muon_jax.muon(0.1)
    expect, _ = plain.update(grads, plain.init(params), params)
    chex.assert_trees_all_close(u, expect, rtol=1e-5, atol=1e-7)


def test_integer_leaves_are_never_updated_and_nan_does_not_reach_momentum():
    params = {"w": jnp.ones((4, 8)) * 3, "count": jnp.full((2, 3), 7, jnp.int32), "flag": jnp.ones(3, bool),
              "bad": jnp.full((4, 4), jnp.nan).at[0, 0].set(jnp.inf)}
    for labels in (None, {"w": "muon", "count": "muon", "flag": "adam", "bad": "muon"}):
        tx = muon_jax.muon(0.5, weight_decay=0.5, labels=labels)
        state = tx.init(params)
        mu = state.inner_states["muon"].inner_state[0].mu
        np.testing.assert_array_equal(np.signbit(mu["bad"]), False)
        np.testing.assert_array_equal(mu["bad"], 0.0)  # p·0 would be NaN
        grads = {"w": jnp.ones((4, 8)), "count": jnp.ones((2, 3), jnp.int32), "flag": jnp.zeros(3, bool),
                 "bad": jnp.ones((4, 4))}
        u, state = jax.jit(tx.update)(grads, state, params)
        new = optax.apply_updates(params, u)
        np.testing.assert_array_equal(new["count"], 7)
        np.testing.assert_array_equal(new["flag"], True)
        assert new["count"].dtype == jnp.int32 and not np.allclose(new["w"], 3.0)


def test_default_labels_warns_once_about_heads_and_conv_kernels():
    import warnings

    params = {"gpt": {"wte": jnp.ones((50, 8)), "h0": {"wq": jnp.ones((8, 8))}},
              "output": {"kernel": jnp.ones((8, 50))}, "stem": jnp.ones((3, 3, 3, 8)),
              "experts_warn_test": jnp.ones((2, 4, 8, 8))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = muon_jax.default_labels(params)
        muon_jax.default_labels(params)
    assert labels["gpt"]["wte"] == labels["stem"] == "muon"  # the rule itself is unchanged
    assert len(caught) == 1, [str(w.message) for w in caught]
    text = str(caught[0].message)
    for leaf in ("['gpt']['wte'] (50, 8)", "['output']['kernel'] (8, 50)", "['stem'] (3, 3, 3, 8)"):
        assert leaf in text, text
    assert "wq" not in text and "experts_warn_test" not in text and "infer_routing" in text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        muon_jax.default_labels({"attn_output": jnp.ones((8, 8)), "heads": jnp.ones((2, 8, 8))})
    assert not caught


def test_nnx_optimizer_with_labels_and_matrix_axes_from_nnx_split():
    """nnx.Optimizer gives tx.init the nnx.Param-wrapped state and tx.update bare arrays: one labels tree and
    one matrix_axes tree, built from nnx.split (wrapped) or from its pure arrays, fit both."""
    from flax import nnx

    class ConvNet(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.head = nnx.Linear(8, 5, rngs=rngs)

        def __call__(self, x):
            return self.head(jax.nn.relu(self.conv(x)).mean((1, 2)))

    x = jax.random.normal(jax.random.key(11), (4, 6, 6, 3))
    y = jnp.arange(4) % 5

    def train(make_trees, steps=3):
        model = ConvNet(nnx.Rngs(0))
        labels, axes = make_trees(nnx.split(model, nnx.Param)[1])
        opt = nnx.Optimizer(model, muon_jax.muon(0.05, ns_dtype=jnp.float32, labels=labels, matrix_axes=axes),
                            wrt=nnx.Param)

        @nnx.jit
        def step(model, opt):
            def loss_fn(m):
                return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            loss, grads = nnx.value_and_grad(loss_fn)(model)
            opt.update(model, grads)
            return loss

        losses = [float(step(model, opt)) for _ in range(steps)]
        return losses, nnx.state(model, nnx.Param)

    def trees(state):
        label = lambda p, v: "muon" if "conv" in jax.tree_util.keystr(p) and v.ndim == 4 else "adam"  # noqa: E731
        labels = jax.tree_util.tree_map_with_path(label, state)
        axes = jax.tree_util.tree_map_with_path(lambda p, v: ((0, 1, 2), (3,)) if v.ndim == 4 else None, state)
        return labels, axes

    wrapped, state_w = train(trees)
    pure, state_p = train(lambda s: trees(nnx.as_pure(s)))
    assert wrapped[-1] < wrapped[0], wrapped
    chex.assert_trees_all_close(nnx.as_pure(state_w), nnx.as_pure(state_p))


def test_public_namespace_and_default_methods():
    import inspect

    documented = {"muon", "default_labels", "scale_by_momentum", "orthogonalize", "scale_by_shape", "newton_schulz",
                  "NS_SCHEDULES", "infer_routing", "Routing", "ScaleByMomentumState"}
    assert documented <= set(muon_jax.__all__), documented - set(muon_jax.__all__)
    assert all(hasattr(muon_jax, name) for name in muon_jax.__all__)
    internal = {"GRAM_RESTART_EVERY", "GRAM_RESTART_EVERY_CUSTOM", "LABELS", "LR_SCALES", "MOONLIGHT_COEFFS",
                "POLAR_EXPRESS_COEFFS", "NS_METHODS", "NS_MODES"}
    assert not internal & set(muon_jax.__all__)
    assert all(hasattr(muon_jax, name) for name in internal)  # still reachable as attributes
    default = lambda f, name: inspect.signature(inspect.unwrap(f)).parameters[name].default  # noqa: E731
    assert default(muon_jax.muon, "ns_method") == default(muon_jax.orthogonalize, "method") \
        == default(muon_jax.newton_schulz, "method") == "auto"


def test_muon_under_an_outer_mask():
    """Inside optax.masked (or another partition) muon sees MaskedNode leaves: they get no label, no check and
    no update; the others equal muon on the unmasked leaves alone."""
    params, grads = small_problem()
    params, grads = {**params, "frozen": jnp.ones((4, 4))}, {**grads, "frozen": jnp.ones((4, 4))}
    for labels in (None, {"w": "muon", "b": "adam", "frozen": "muon"}):
        tx = optax.masked(muon_jax.muon(0.1, ns_dtype=jnp.float32, labels=labels),
                          {"w": True, "b": True, "frozen": False})
        u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        sub = {k: params[k] for k in ("w", "b")}
        plain = muon_jax.muon(0.1, ns_dtype=jnp.float32)
        expect, _ = plain.update({k: grads[k] for k in sub}, plain.init(sub), sub)
        chex.assert_trees_all_close({k: u[k] for k in sub}, expect, rtol=1e-6)
        np.testing.assert_array_equal(u["frozen"], grads["frozen"])  # optax.masked passes it through
