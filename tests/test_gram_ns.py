"""Gram Newton–Schulz (newton_schulz(method="gram"), muon(ns_method=...)): the same result as standard NS
in float32 on hard matrices and real momentum, the float64 polynomial as an independent reference,
auto's choice, the FLOPs it saves, the symmetric-product hook, inject_hyperparams and distributed NS."""
import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import muon_jax
from bench.gram_ns import ns_float64  # the NS polynomial in float64 numpy, independent of muon_jax's code

ns_module = importlib.import_module("muon_jax.newton_schulz")  # the package attribute is the function

FIXTURE = Path(__file__).parent / "fixtures" / "momentum_tiny.npz"
CUSTOM = ((3.0, -3.2, 1.2), (2.5, -2.0, 0.6))  # a made-up per-step schedule


def hard_matrices(n=32, m=96, seed=0):
    """[n, m] float64: Gaussian, singular values log-spaced 1e-6..1, rank 4, and their transposes' kin."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((m, n)))
    return {"gaussian": rng.standard_normal((n, m)),
            "ill-conditioned": (u * np.logspace(-6, 0, n)) @ v.T,
            "rank-deficient": rng.standard_normal((n, 4)) @ rng.standard_normal((4, m))}


def momentum_matrices():
    """Layer 0 of each Muon momentum buffer of a tiny-config run (how: the fixture's `how` entry)."""
    with np.load(FIXTURE) as f:
        assert "bench.gram_ns --make-fixture" in str(f["how"])
        return {k: f[k].astype(np.float64) for k in f.files if k != "how"}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def ns32(m, coeffs, method, **kw):
    return muon_jax.newton_schulz(jnp.asarray(m, jnp.float32), coeffs=coeffs, dtype=jnp.float32, method=method, **kw)


def muon_update(params, method):
    """One jitted float32 muon update from a fresh state."""
    tx = muon_jax.muon(0.1, ns_dtype=jnp.dtype("float32"), ns_method=method)
    return jax.jit(tx.update)(params, tx.init(params), params)[0]


@pytest.mark.parametrize("coeffs", ["moonlight", "polar_express", CUSTOM])
def test_gram_equals_standard_in_float32(coeffs):
    # Same-shape matrices go in one batch (fewer compilations); errors are per matrix.
    batches = [hard_matrices(), {f"tall {k}": v.T for k, v in hard_matrices(24, 60, 1).items()},
               *({k: v} for k, v in momentum_matrices().items())]
    assert sum(map(len, batches)) == 10
    for batch in batches:
        stacked = np.stack(list(batch.values()))
        standard, gram = ns32(stacked, coeffs, "standard"), ns32(stacked, coeffs, "gram")
        for name, m, s, g in zip(batch, stacked, standard, gram):
            assert rel(g, s) <= 1e-4, (name, rel(g, s))
            assert rel(g, ns_float64(m, coeffs)) <= 1e-4, (name, rel(g, ns_float64(m, coeffs)))


def test_batched_restarts_and_traced_steps():
    x = jax.random.normal(jax.random.key(0), (2, 3, 16, 40))
    ref = np.stack([ns_float64(np.asarray(m, np.float64), "polar_express", 7) for m in x.reshape(-1, 16, 40)])
    for restarts in [(), (1, 2, 3, 4, 5, 6, 9)]:  # 9: past the last step, ignored
        out = ns32(x, "polar_express", "gram", steps=7, restarts=restarts)
        assert out.shape == x.shape and rel(out.reshape(ref.shape), ref) <= 1e-4, restarts
    # optax.inject_hyperparams makes ns_steps an array: the segments then run as fori_loops.
    traced = jax.jit(lambda x, steps: ns_module.newton_schulz_iterate(
        x, steps=steps, coeffs="polar_express", eps=1e-7, dtype=jnp.float32, method="gram"))
    for steps in (2, 7):
        static = ns32(x, "polar_express", "gram", steps=steps)
        np.testing.assert_allclose(traced(x, jnp.asarray(steps)), static, atol=2e-5)


def test_auto_choice_and_defaults():
    assert ns_module.resolve_method("auto", (7, 128, 256), jnp.float32) == "gram"
    assert ns_module.resolve_method("auto", (256, 128), jnp.float32) == "gram"
    assert ns_module.resolve_method("auto", (128, 128), jnp.float32) == "standard"
    assert ns_module.resolve_method("auto", (100, 150), jnp.float32) == "standard"  # ratio 1.5, not above
    assert ns_module.resolve_method("auto", (128, 512), jnp.bfloat16) == "standard"
    assert ns_module.resolve_restarts(None, jnp.float32, 5, "moonlight") == (3,)
    assert ns_module.resolve_restarts(None, jnp.float32, 5, "polar_express") == (2, 4)
    assert ns_module.resolve_restarts(None, jnp.bfloat16, 5, "moonlight") == (1, 2, 3, 4)
    # Through the optimizer: auto runs exactly the program of the method it picks.
    params = {"wide": jax.random.normal(jax.random.key(1), (2, 16, 40)),
              "square": jax.random.normal(jax.random.key(2), (24, 24))}
    run = {m: muon_update(params, m) for m in ("auto", "gram", "standard")}
    np.testing.assert_array_equal(run["auto"]["wide"], run["gram"]["wide"])
    np.testing.assert_array_equal(run["auto"]["square"], run["standard"]["square"])
    assert not np.array_equal(run["gram"]["wide"], run["standard"]["wide"])


def update_flops(x, method):
    lowered = jax.jit(lambda x: muon_jax.newton_schulz(x, dtype=jnp.float32, method=method)).lower(x)
    cost = lowered.compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_gram_saves_the_predicted_flops():
    n, m = 64, 256
    x = jnp.ones((n, m))
    standard, gram = update_flops(x, "standard"), update_flops(x, "gram")
    # 5 steps of 4n²m + 2n³; Gram with the restart at 3: two segments, each X Xᵀ and Q X (4n²m), and
    # 4k − 3 n×n products for a k-step segment (k = 3, 2). Standard NS updates this X in 4 column
    # blocks, whose writes add elementwise FLOPs (2% at this small n).
    assert standard == pytest.approx(5 * (4 * n * n * m + 2 * n**3), rel=0.03)
    assert gram == pytest.approx(2 * 4 * n * n * m + (9 + 5) * 2 * n**3, rel=0.02)
    assert update_flops(jnp.ones((n, n)), "auto") == update_flops(jnp.ones((n, n)), "standard")


def test_symmetric_products_go_through_one_function(monkeypatch):
    """Every X Xᵀ and n×n product is ``symmetric_matmul``: replacing it by a one-triangle kernel
    (upper triangle computed, then mirrored) keeps the result, and a counter sees all of them."""
    calls = []

    def one_triangle(a, b, precision, out_dtype=None):
        calls.append((a.shape, b.shape))
        upper = jnp.triu(jnp.matmul(a, b, precision=precision, preferred_element_type=out_dtype))
        return upper + jnp.swapaxes(jnp.triu(upper, 1), -1, -2)

    x = hard_matrices()["gaussian"]
    ref = {meth: ns32(x, "moonlight", meth) for meth in ("standard", "gram")}
    monkeypatch.setattr(ns_module, "symmetric_matmul", one_triangle)
    for method, n_calls in (("standard", 10), ("gram", 16)):
        calls.clear()
        out = jax.jit(lambda x, method=method: ns_module.newton_schulz_iterate(
            x, steps=5, coeffs="moonlight", eps=1e-7, dtype=jnp.float32, method=method))(jnp.asarray(x, jnp.float32))
        assert len(calls) == n_calls, calls
        assert all(sa[-2] == sb[-1] == 32 for sa, sb in calls), calls  # results are n×n, n the short side
        assert rel(out, ref[method]) <= 1e-5


def test_inject_hyperparams_with_gram():
    params = {"w": jax.random.normal(jax.random.key(3), (2, 12, 40)), "b": jnp.zeros(40)}
    plain = muon_update(params, "gram")
    injected = optax.inject_hyperparams(muon_jax.muon)(learning_rate=0.1, ns_dtype=jnp.dtype("float32"),
                                                       ns_method="gram", ns_restarts=(2,))
    state = injected.init(params)
    assert "ns_steps" in state.hyperparams  # the step count is traced: the fori_loop path runs
    u1, _ = jax.jit(injected.update)(params, state, params)
    np.testing.assert_allclose(u1["w"], plain["w"], rtol=1e-4, atol=1e-6)
    state.hyperparams["learning_rate"] = jnp.asarray(0.2)
    u2, _ = jax.jit(injected.update)(params, state, params)
    np.testing.assert_allclose(u2["w"], 2 * u1["w"], rtol=1e-5)


@pytest.mark.parametrize("mode", muon_jax.NS_MODES)
def test_distributed_gram_matches_single_device(mode):
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",), axis_types=(AxisType.Auto,))
    shapes = {"stack": ((5, 24, 72), P(None, "fsdp", None)), "tall": ((80, 16), P("fsdp", None)),
              "square": ((16, 16), P(None, "fsdp"))}
    params = {k: jax.random.normal(jax.random.key(i), s) for i, (k, (s, _)) in enumerate(shapes.items())}
    ref = muon_update(params, "auto")
    # told the specs, as the trainer does: every mode then returns each update in its parameter's layout
    tx = muon_jax.muon(0.1, ns_dtype=jnp.dtype("float32"), ns_method="auto", mesh=mesh, ns_axis="fsdp",
                       ns_mode=mode, param_specs={k: spec for k, (_, spec) in shapes.items()})
    sharded = jax.device_put(params, {k: NamedSharding(mesh, spec) for k, (_, spec) in shapes.items()})
    out = jax.jit(tx.update)(sharded, jax.jit(tx.init)(sharded), sharded)[0]
    for k in params:
        assert rel(out[k], ref[k]) <= 1e-5, (k, rel(out[k], ref[k]))
        assert out[k].sharding.is_equivalent_to(sharded[k].sharding, out[k].ndim), k


def test_bad_method_and_restarts():
    with pytest.raises(ValueError, match="Unknown ns_method 'fast'.*gram"):
        muon_jax.muon(0.1, ns_method="fast")
    with pytest.raises(ValueError, match="tuple of positive iteration indices"):
        muon_jax.muon(0.1, ns_restarts=[2])
    with pytest.raises(ValueError, match="tuple of positive iteration indices"):
        muon_jax.newton_schulz(jnp.ones((4, 8)), method="gram", restarts=(0,))
