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

A, B, C = muon_jax.MOONLIGHT_COEFFS


# ---------------------------------------------------------------- float64 numpy reference (Moonlight)
def ns_ref(m, steps=5):
    """Moonlight's zeropower_via_newtonschulz5 in float64, one matrix at a time."""
    x = m / (np.linalg.norm(m) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        a = x @ x.T
        x = A * x + (B * a + C * a @ a) @ x
    return x.T if tall else x


def muon_ref_update(g, buf, w, *, lr, mu, nesterov, wd):
    buf = mu * buf + g
    m = g + mu * buf if nesterov else buf
    flat = m.reshape(-1, *m.shape[-2:])
    o = np.stack([ns_ref(x) for x in flat]).reshape(m.shape)
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
        ref = np.stack([ns_ref(np.asarray(m, np.float64)) for m in mats]) if name == "moonlight" else None
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
