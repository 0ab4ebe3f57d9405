"""muon_jax.infer_routing: every rule against models written in other people's styles, names and frameworks.

The models here are deliberately not the trainer's: plain-jax dict GPT-2 (tied head), linen (nn.scan, Conv,
DenseGeneral), nnx, equinox, MoE einsums. Expected labels and axes are stated by hand from each model's math.
Tracing only (ShapeDtypeStruct params) except where a test trains or compares an update.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muon_jax
from conftest import ns_reference
from muon_jax import infer_routing

S = jax.ShapeDtypeStruct
F32 = jnp.float32


def leaves_by_path(tree):
    """{keystr(path): leaf} with (rows, cols) pairs and None kept as leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or muon_jax.is_axes_pair(x))
    return {jax.tree_util.keystr(p): x for p, x in flat}


def routing_of(r):
    """{path: (label, matrix_axes)} of a Routing."""
    labels, axes = leaves_by_path(r.labels), leaves_by_path(r.matrix_axes)
    return {p: (labels[p], axes[p]) for p in labels}


# ---------------------------------------------------------------------------------------------- GPT-2, plain jax
def gpt2_params(d=16, vocab=50, ctx=8, layers=2):
    block = lambda: {"ln_1": {"g": S((d,), F32), "b": S((d,), F32)},
                     "attn": {"c_attn": {"w": S((d, 3 * d), F32), "b": S((3 * d,), F32)},
                              "c_proj": {"w": S((d, d), F32), "b": S((d,), F32)}},
                     "ln_2": {"g": S((d,), F32), "b": S((d,), F32)},
                     "mlp": {"c_fc": {"w": S((d, 4 * d), F32), "b": S((4 * d,), F32)},
                             "c_proj": {"w": S((4 * d, d), F32), "b": S((d,), F32)}}}
    return {"wte": S((vocab, d), F32), "wpe": S((ctx, d), F32), "h": [block() for _ in range(layers)],
            "ln_f": {"g": S((d,), F32), "b": S((d,), F32)}}


def layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def gpt2_logits(params, tokens, heads=2):
    t = tokens.shape[1]
    x = params["wte"][tokens] + params["wpe"][:t]
    for i in range(len(params["h"])):
        blk = params["h"][i]
        q, k, v = jnp.split(layer_norm(x, blk["ln_1"]) @ blk["attn"]["c_attn"]["w"] + blk["attn"]["c_attn"]["b"],
                            3, axis=-1)
        split = lambda a: a.reshape(a.shape[0], t, heads, -1)
        a = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=True).reshape(x.shape)
        x = x + a @ blk["attn"]["c_proj"]["w"] + blk["attn"]["c_proj"]["b"]
        h = jax.nn.gelu(layer_norm(x, blk["ln_2"]) @ blk["mlp"]["c_fc"]["w"] + blk["mlp"]["c_fc"]["b"])
        x = x + h @ blk["mlp"]["c_proj"]["w"] + blk["mlp"]["c_proj"]["b"]
    return layer_norm(x, params["ln_f"]) @ params["wte"].T  # tied head


def gpt2_loss(params, tokens, targets):
    logp = jax.nn.log_softmax(gpt2_logits(params, tokens))
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


def test_gpt2_dict_tied_head():
    tokens = S((2, 8), jnp.int32)
    r = infer_routing(gpt2_loss, gpt2_params(), tokens, tokens)
    got = routing_of(r)
    muon = {p for p, (label, _) in got.items() if label == "muon"}
    assert muon == {f"['h'][{i}]['{m}']['{w}']['w']" for i in (0, 1)
                    for m, w in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))}
    assert all(got[p][1] == ((0,), (1,)) for p in muon)
    assert all(axes is None for label, axes in got.values() if label == "adam")
    reasons = leaves_by_path(r.reasons)
    assert "gather" in reasons["['wte']"] and "output" in reasons["['wte']"]  # embedding and tied head
    assert "1-D" in reasons["['h'][0]['ln_1']['g']"]
    # the same model returning logits routes the same
    assert routing_of(infer_routing(gpt2_logits, gpt2_params(), tokens)) == got


def test_additive_position_table_and_head_named_like_a_hidden_layer():
    """wpe sliced and added (no gather) is element-wise; an untied head named 'proj' is still the output layer."""
    d = 8
    params = {"tok": S((20, d), F32), "pos": S((6, d), F32), "w1": S((d, 32), F32), "proj": S((32, 20), F32)}

    def fn(p, tokens):
        x = jax.nn.one_hot(tokens, 20) @ p["tok"] + p["pos"][: tokens.shape[1]]   # one-hot: an embedding
        return jnp.tanh(jax.nn.relu(x @ p["w1"]) @ p["proj"])
    got = routing_of(infer_routing(fn, params, S((2, 6), jnp.int32)))
    assert got == {"['pos']": ("adam", None), "['proj']": ("adam", None), "['tok']": ("adam", None),
                   "['w1']": ("muon", ((0,), (1,)))}


def test_regression_head_and_loss_with_args():
    params = {"a": S((4, 16), F32), "b": S((16, 16), F32), "c": S((16, 1), F32)}

    def loss(p, x, y):
        h = jax.nn.relu(jax.nn.relu(x @ p["a"]) @ p["b"])
        return jnp.mean((h @ p["c"] - y) ** 2)
    got = routing_of(infer_routing(loss, params, S((8, 4), F32), S((8, 1), F32)))
    assert [got[f"['{k}']"][0] for k in "abc"] == ["muon", "muon", "adam"]


def test_int_bool_unused_and_non_array_leaves():
    params = {"w": jnp.ones((4, 4)), "h": jnp.ones((4, 4)), "count": jnp.zeros((3, 3), jnp.int32),
              "mask": jnp.ones((2, 4), bool), "spare": jnp.ones((5, 5)), "name": "layer"}

    def fn(p, x):
        return (jnp.where(p["mask"], x @ p["w"], 0.0) @ p["h"]).sum() + p["count"].sum()
    r = infer_routing(fn, params, jnp.ones((2, 4)))
    got = routing_of(r)
    assert got["['w']"] == ("muon", ((0,), (1,)))
    assert [got[k][0] for k in ("['count']", "['mask']", "['spare']", "['name']")] == ["adam"] * 4
    reasons = leaves_by_path(r.reasons)
    assert "int32" in reasons["['count']"] and "bool" in reasons["['mask']"]
    assert reasons["['spare']"] == "unused by fn" and reasons["['name']"] == "not an array"


# ---------------------------------------------------------------------------------------------- flax linen
def test_linen_scan_stack_with_layer_norm():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            h = nn.LayerNorm(name="ln_1")(x)
            return x + nn.Dense(16, name="fc_out")(nn.gelu(nn.Dense(32, name="fc_in")(h))), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(16, name="stem")(x)
            stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            x, _ = stack(name="blocks")(x, None)
            return nn.Dense(5, name="head")(x)

    x = jnp.ones((2, 8))
    variables = jax.eval_shape(Net().init, jax.random.key(0), x)
    r = infer_routing(lambda v, x: Net().apply(v, x), variables, S((2, 8), F32))
    got, reasons = routing_of(r), leaves_by_path(r.reasons)
    blocks = "['params']['blocks']"
    assert reasons[f"{blocks}['ln_1']['scale']"] == "used only elementwise (mul with activations)"
    assert got[f"{blocks}['ln_1']['scale']"] == ("adam", None)          # [3, 16]: stacked, element-wise
    assert got[f"{blocks}['ln_1']['bias']"] == ("adam", None)
    assert got[f"{blocks}['fc_in']['kernel']"] == ("muon", ((1,), (2,)))  # [3, 16, 32]: 3 matrices
    assert got[f"{blocks}['fc_out']['kernel']"] == ("muon", ((1,), (2,)))
    assert got[f"{blocks}['fc_in']['bias']"] == ("adam", None)            # [3, 32]
    assert got["['params']['stem']['kernel']"] == ("muon", ((0,), (1,)))
    assert got["['params']['head']['kernel']"] == ("adam", None)


class _LinenCNN:
    """A linen CNN: two 3x3 convs and a Dense classifier `head`."""

    @staticmethod
    def module():
        import flax.linen as nn

        class CNN(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
                x = nn.relu(nn.Conv(8, (3, 3), name="conv2")(x))
                return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))
        return CNN()


def test_linen_cnn_conv_kernel_is_hwio_matrix():
    cnn = _LinenCNN.module()
    variables = jax.eval_shape(cnn.init, jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    got = routing_of(infer_routing(lambda v, x: cnn.apply(v, x), variables, S((2, 8, 8, 3), F32)))
    assert got["['params']['conv1']['kernel']"] == ("muon", ((0, 1, 2), (3,)))   # [3, 3, 3, 8]
    assert got["['params']['conv2']['kernel']"] == ("muon", ((0, 1, 2), (3,)))
    assert got["['params']['head']['kernel']"] == ("adam", None)
    assert got["['params']['conv1']['bias']"] == ("adam", None)


def test_conv_update_with_inferred_routing_is_ns_of_flattened_kernel():
    """Muon with the inferred routing updates a HWIO kernel [3,3,4,6] as the matrix [36, 6]:
    -0.2·sqrt(max(A, B))·NS(G reshaped), to 1e-4 in float32."""
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 6))

    def fn(p, x):
        y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (y @ p["w"]).sum()
    params = {"k": kernel, "w": jnp.ones((6, 6))}
    r = infer_routing(fn, params, S((1, 5, 5, 4), F32))
    assert leaves_by_path(r.matrix_axes)["['k']"] == ((0, 1, 2), (3,))
    grads = {"k": jax.random.normal(jax.random.key(1), kernel.shape), "w": jnp.zeros((6, 6))}
    tx = muon_jax.muon(1.0, momentum=0.0, weight_decay=0.0, ns_dtype=jnp.dtype(F32), labels=r.labels,
                       matrix_axes=r.matrix_axes)
    updates, _ = tx.update(grads, tx.init(params), params)
    expect = -0.2 * math.sqrt(36) * ns_reference(np.asarray(grads["k"], np.float64).reshape(36, 6))
    np.testing.assert_allclose(np.asarray(updates["k"]).reshape(36, 6), expect, atol=1e-4)


def test_linen_dense_general_heads():
    """DenseGeneral [d, heads, hd] is one [d, heads·hd] matrix; the output DenseGeneral [heads, hd, d] over
    axis=(-2, -1) is [heads·hd, d]."""
    import flax.linen as nn

    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.DenseGeneral((2, 4), name="query")(x)                 # [b, t, 2, 4]
            k = nn.DenseGeneral((2, 4), name="key")(x)
            w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
            v = nn.DenseGeneral((2, 4), name="value")(x)
            o = nn.DenseGeneral(8, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", w, v))
            return nn.Dense(3, name="cls")(x + o)

    x = jnp.ones((1, 5, 8))
    variables = jax.eval_shape(Attn().init, jax.random.key(0), x)
    got = routing_of(infer_routing(lambda v, x: Attn().apply(v, x), variables, S((1, 5, 8), F32)))
    for name in ("query", "key", "value"):
        assert got[f"['params']['{name}']['kernel']"] == ("muon", ((0,), (1, 2))), name
    assert got["['params']['out']['kernel']"] == ("muon", ((0, 1), (2,)))
    assert got["['params']['cls']['kernel']"] == ("adam", None)


# ---------------------------------------------------------------------------------------------- nnx and equinox
def test_nnx_model_trains_with_inferred_routing():
    from flax import nnx

    class Mixer(nnx.Module):
        def __init__(self, rngs):
            self.tok = nnx.Embed(24, 16, rngs=rngs)
            self.norm = nnx.RMSNorm(16, rngs=rngs)
            self.up = nnx.Linear(16, 48, rngs=rngs)
            self.down = nnx.Linear(48, 16, rngs=rngs)
            self.readout = nnx.Linear(16, 24, rngs=rngs)

        def __call__(self, t):
            x = self.tok(t)
            x = x + self.down(jax.nn.silu(self.up(self.norm(x))))
            return self.readout(x)

    model = Mixer(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.arange(16).reshape(2, 8) % 24

    def loss_of(p, t):
        logits = nnx.merge(graphdef, p, rest)(t)
        return optax.softmax_cross_entropy_with_integer_labels(logits, (t + 1) % 24).mean()
    r = infer_routing(loss_of, params, S(tokens.shape, jnp.int32))
    labels = leaves_by_path(r.labels)
    assert {p for p, l in labels.items() if l == "muon"} == {"['up']['kernel'].value", "['down']['kernel'].value"}
    opt = nnx.Optimizer(model, muon_jax.muon(0.02, labels=r.labels, matrix_axes=r.matrix_axes), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(
            m(tokens), (tokens + 1) % 24).mean())(model)
        opt.update(model, grads)
        return loss
    losses = [float(step(model, opt)) for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_equinox_model_trains_with_inferred_routing():
    import equinox as eqx

    class Net(eqx.Module):
        layers: list
        scale: jax.Array

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.layers = [eqx.nn.Linear(6, 32, key=k1), eqx.nn.Linear(32, 32, key=k2), eqx.nn.Linear(32, 1, key=k3)]
            self.scale = jnp.ones((2, 32))

        def __call__(self, x):
            h = jax.nn.tanh(self.layers[0](x)) * self.scale[0]
            h = jax.nn.tanh(self.layers[1](h)) * self.scale[1]
            return self.layers[2](h)[0]

    model = Net(jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x = jax.random.normal(jax.random.key(1), (64, 6))
    y = jnp.sin(x.sum(-1))

    def loss(p, x, y):
        m = eqx.combine(p, static)
        return jnp.mean((jax.vmap(m)(x) - y) ** 2)
    r = infer_routing(loss, params, x, y)
    got = routing_of(r)
    # eqx.nn.Linear stores weight [out, in] and computes W @ x: rows (fan-in) are axis 1
    assert got[".layers[0].weight"] == ("muon", ((1,), (0,)))
    assert got[".layers[1].weight"] == ("muon", ((1,), (0,)))
    assert got[".layers[2].weight"] == ("adam", None)
    assert got[".scale"] == ("adam", None)
    tx = muon_jax.muon(0.02, labels=r.labels, matrix_axes=r.matrix_axes)
    state = tx.init(params)

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(loss)(p, x, y)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value
    losses = []
    for _ in range(30):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------- MoE and dtypes
def test_moe_expert_stack_dispatched_per_expert_is_a_batch():
    params = {"router": S((8, 4), F32), "w_in": S((4, 8, 16), F32), "w_out": S((4, 16, 8), F32),
              "w_wide": S((4, 8, 16), F32), "head": S((8, 3), F32)}

    def fn(p, x):                                     # x [tokens, d]
        gate = jax.nn.softmax(x @ p["router"], -1)    # [c, e]
        dispatched = jnp.einsum("ce,cd->ecd", gate, x)
        h = jax.nn.relu(jnp.einsum("ecd,edf->ecf", dispatched, p["w_in"]))
        y = jnp.einsum("ecd,ce->cd", jnp.einsum("ecf,efd->ecd", h, p["w_out"]), gate)  # combined per token
        wide = jnp.einsum("cd,edf->cef", x, p["w_wide"]).reshape(x.shape[0], -1)  # E a free output dim
        return (y + wide[:, :8]) @ p["head"]
    got = routing_of(infer_routing(fn, params, S((6, 8), F32)))
    assert got["['w_in']"] == ("muon", ((1,), (2,)))
    assert got["['w_out']"] == ("muon", ((1,), (2,)))
    assert got["['w_wide']"] == ("muon", ((1,), (0, 2)))   # one matrix [d, E·f]
    assert got["['router']"] == ("muon", ((0,), (1,)))
    assert got["['head']"] == ("adam", None)


def test_ragged_dot_experts_and_bf16_params():
    params = {"experts": S((2, 4, 8, 16), jnp.bfloat16), "mix": S((8, 16), F32), "out": S((16, 2), F32)}

    def fn(p, x, sizes):
        def layer(h, w):
            return jax.lax.ragged_dot(h, w, sizes), None
        h, _ = jax.lax.scan(layer, x.astype(jnp.bfloat16), p["experts"][:, :, :, :8])
        h = h.astype(jnp.bfloat16) @ p["mix"].astype(jnp.bfloat16)   # float32 cast to bf16 before the matmul
        return (h.astype(F32) @ p["out"]).sum()
    got = routing_of(infer_routing(fn, params, S((12, 8), jnp.bfloat16), S((4,), jnp.int32)))
    assert got["['experts']"] == ("muon", ((2,), (3,)))     # layers scanned, experts grouped: 2 x 4 matrices
    assert got["['mix']"] == ("muon", ((0,), (1,)))
    assert got["['out']"] == ("adam", None)


# ---------------------------------------------------------------------------------------------- disagreement
def test_disagreeing_uses_go_to_adam_with_a_reason():
    params = {"both_ways": S((8, 8), F32), "gain_and_matmul": S((8, 8), F32), "w": S((8, 8), F32),
              "o": S((8, 2), F32)}

    def fn(p, x):
        h = x @ p["both_ways"] + x @ p["both_ways"].T               # contracted on axis 0 and on axis 1
        h = h @ p["gain_and_matmul"] + (h[:, :, None] * p["gain_and_matmul"]).sum(1)  # and element-wise
        return jax.nn.relu(h @ p["w"]) @ p["o"]
    r = infer_routing(fn, params, S((3, 8), F32))
    got, reasons = routing_of(r), leaves_by_path(r.reasons)
    assert got["['both_ways']"] == ("adam", None) and "disagreeing" in reasons["['both_ways']"]
    assert got["['gain_and_matmul']"] == ("adam", None) and "disagreeing" in reasons["['gain_and_matmul']"]
    assert got["['w']"] == ("muon", ((0,), (1,)))


# ---------------------------------------------------------------------------------------------- control flow
def test_followed_through_transforms():
    """The view survives jit, remat, custom_jvp, custom_vjp, vmap, cond, while_loop, scan and shard_map."""
    from jax.sharding import PartitionSpec as P
    mesh = jax.make_mesh((1,), ("x",))
    names = ["jit", "remat", "custom_jvp", "custom_vjp", "vmap", "cond", "while", "scan_t", "shard_map"]
    params = {n: S((4, 8, 16) if n in ("vmap", "scan_t") else (8, 16), F32) for n in names}
    params["scan_t"] = S((4, 16, 8), F32)          # stored transposed, contracted on axis 2
    params["out"] = S((16, 1), F32)

    @jax.custom_vjp
    def matmul(x, w):
        return x @ w
    matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    @jax.custom_jvp
    def softplus_matmul(x, w):
        return jax.nn.softplus(x @ w)

    @softplus_matmul.defjvp
    def _(primals, tangents):
        (x, w), (dx, dw) = primals, tangents
        y = x @ w
        return jax.nn.softplus(y), jax.nn.sigmoid(y) * (dx @ w + x @ dw)

    def fn(p, x):                                   # x [c, 8]
        ys = [jax.jit(lambda a, w: a @ w)(x, p["jit"]),
              jax.checkpoint(lambda a, w: jnp.tanh(a @ w))(x, p["remat"]),
              matmul(x, p["custom_vjp"]),
              softplus_matmul(x, p["custom_jvp"]),
              jax.vmap(lambda a, w: a @ w)(jnp.stack([x] * 4), p["vmap"]).sum(0),
              jax.lax.cond(x.sum() > 0, lambda w: x @ w, lambda w: -(x @ w), p["cond"]),
              jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] + x @ p["while"]),
                                 (0, jnp.zeros((x.shape[0], 16))))[1],
              jax.lax.scan(lambda h, w: (h + jnp.einsum("cd,fd->cf", x, w), None), jnp.zeros((x.shape[0], 16)),
                           p["scan_t"])[0],
              jax.shard_map(lambda a, w: a @ w, mesh=mesh, in_specs=(P(), P()), out_specs=P())(x, p["shard_map"])]
        return sum(jax.nn.relu(y) for y in ys) @ p["out"]
    got = routing_of(infer_routing(fn, params, S((3, 8), F32)))
    expect = {n: ((0,), (1,)) for n in ("jit", "remat", "custom_jvp", "custom_vjp", "cond", "while", "shard_map")}
    expect.update(vmap=((1,), (2,)), scan_t=((2,), (1,)))
    assert {n: got[f"['{n}']"][1] for n in names} == expect
    assert got["['out']"][0] == "adam"


def test_integer_aux_outputs_do_not_make_a_head():
    """A router whose top-k indices (integers, no gradient) are returned as an aux output is not an output layer."""
    params = {"router": S((8, 4), F32), "experts": S((4, 8, 8), F32), "head": S((8, 5), F32)}

    def fn(p, x):
        scores = x @ p["router"]
        _, idx = jax.lax.top_k(scores, 1)
        weight = jax.nn.sigmoid(jnp.take_along_axis(scores, idx, -1))
        h = jnp.einsum("cd,cdf->cf", x, p["experts"][idx[:, 0]])  # gathered experts: per-token matrices
        return (h * weight) @ p["head"], jnp.bincount(idx[:, 0], length=4)
    got = routing_of(infer_routing(fn, params, S((6, 8), F32)))
    assert got["['router']"] == ("muon", ((0,), (1,)))
    assert got["['head']"] == ("adam", None)
    assert got["['experts']"][0] == "adam"   # read by a gather (per-token expert weights)


# ---------------------------------------------------------------------------------------------- output
def test_table_and_summary():
    tokens = S((2, 8), jnp.int32)
    r = infer_routing(gpt2_loss, gpt2_params(), tokens, tokens)
    lines = str(r).splitlines()
    assert len(lines) == 1 + len(jax.tree.leaves(gpt2_params()))
    row = next(line for line in lines if line.startswith("['h'][0]['attn']['c_attn']['w']"))
    assert "(16, 48)" in row and "muon" in row and "1 x 16 x 48" in row
    assert r.summary().startswith("routing: 8 muon (") and ", 20 adam (" in r.summary()


# ---------------------------------------------------------------------------------------------- the trainer
def trainer_tree(model_dict):
    from flax import nnx
    from train.models import abstract_model, model_config_from_dict
    model = abstract_model(model_config_from_dict({"vocab_size": 64, **model_dict}))
    return nnx.split(model, nnx.Param, ...)


@pytest.mark.parametrize("config", ["configs/tiny.yaml", "configs/moonlight_tiny.yaml", "qwen2"])
def test_trainer_routing_equals_default_labels(config):
    """On the trainer's own Llama, Qwen2 and DeepSeek-V3 trees, the inferred routing is today's rule, and the
    matrices are the last two axes."""
    import yaml
    from train.loop import model_routing
    model = (yaml.safe_load(open(config))["model"] if config != "qwen2" else
             {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": True})
    graphdef, params, variables = trainer_tree(model)
    r = model_routing(graphdef, params, variables, rows=2, seq_len=8)
    assert jax.tree.leaves(r.labels) == jax.tree.leaves(muon_jax.default_labels(params))
    for shape, label, axes in zip(map(np.shape, jax.tree.leaves(params)), jax.tree.leaves(r.labels),
                                  leaves_by_path(r.matrix_axes).values()):
        if label == "muon":
            assert axes == ((len(shape) - 2,), (len(shape) - 1,))


def test_plan_counts_optimizer_state_by_the_inferred_routing():
    """train.plan: one Muon buffer per matrix, two AdamW buffers for every leaf the routing sends to AdamW."""
    import yaml
    from train.models import model_config_from_dict
    from train.plan import state_bytes
    model = yaml.safe_load(open("configs/moonlight_tiny.yaml"))["model"]
    model_cfg = model_config_from_dict({"vocab_size": 64, **model})
    _, params, _ = trainer_tree(model)
    mesh = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    sizes = [(math.prod(x.shape) * x.dtype.itemsize, label)
             for x, label in zip(jax.tree.leaves(params), jax.tree.leaves(muon_jax.default_labels(params)))]
    assert state_bytes(model_cfg, mesh, "muon") == (sum(s for s, _ in sizes),
                                                    sum(s * (2 if l == "adam" else 1) for s, l in sizes))


def test_side_outputs_of_hidden_layers_do_not_make_a_head():
    """A router in an auxiliary balancing loss and a layer whose batch mean is returned still feed later matmuls:
    hidden, not output layers."""
    params = {"router": S((8, 4), F32), "experts": S((4, 8, 8), F32), "head": S((8, 5), F32)}

    def fn(p, x):
        probs = jax.nn.softmax(x @ p["router"], -1)                          # [c, e]
        h = jnp.einsum("ce,ecf->cf", probs, jnp.einsum("cd,edf->ecf", x, p["experts"]))
        balance = 4 * jnp.sum(probs.mean(0) ** 2)                            # reaches the loss directly
        return (h @ p["head"]).mean() + 0.01 * balance, h.mean(0)            # and h's batch statistics
    got = routing_of(infer_routing(fn, params, S((6, 8), F32)))
    assert got["['router']"] == ("muon", ((0,), (1,)))
    assert got["['experts']"] == ("muon", ((1,), (0, 2)))   # E a free output dim of the expert matmul
    assert got["['head']"] == ("adam", None)


def test_readme_examples_print_their_tables():
    """README "Using muon_jax with your own model": each example runs and prints the table shown under it."""
    import contextlib
    import io
    import re
    from pathlib import Path
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Using muon_jax with your own model")[1].split("\n## ")[0]
    examples = re.findall(r"```python\n(.*?)```\n```\n(.*?)```", section, re.S)
    assert len(examples) == 4
    for code, table in examples:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})
        assert printed.getvalue().strip() == table.strip(), code.splitlines()[0]
