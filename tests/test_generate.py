"""Generation: the KV-cache decode path against full recomputation and against transformers' greedy `generate`,
nucleus sampling against its exact distribution, chat templates against transformers' renderer, and the CLI."""
import functools
import io
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from train.data import HFTokenizer
from train.data.chat import DEFAULT_CHAT_TEMPLATE, render_chat
from train.decode import generate, sample_token
from train.generate import chat, main
from train.models.hf import load_hf_checkpoint
from train.models import DeepseekV3Config, LlamaConfig, Qwen2Config

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "llama_gqa": LlamaConfig(**SMALL, num_key_value_heads=2, head_dim=16),
    "qwen2_bias_gqa": Qwen2Config(**SMALL, num_key_value_heads=1, tie_word_embeddings=True),
    "deepseek_v3": DeepseekV3Config(**SMALL, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4,
                                    num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                                    kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                    v_head_dim=8),
}
PROMPT = [5, 17, 3, 42, 8, 8, 29]


@pytest.fixture(scope="module")
def tiny_model(random_model):
    """name -> a tiny random model, shared by the tests of one worker (none of them changes it)."""
    return functools.cache(lambda name: random_model(CONFIGS[name], stddev=0.3))


def is_greedy_continuation(model, prompt, tokens):
    """Reference without a cache or padding: one causal forward over prompt + tokens gives, at every position,
    exactly the logits a full recompute would see at that step; each token must be their argmax."""
    logits = model(jnp.asarray([list(prompt) + list(tokens)]))[0, len(prompt) - 1:-1]
    return np.asarray(jnp.argmax(logits, axis=-1)).tolist() == list(tokens)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_recomputed_argmax(name, tiny_model):
    model = tiny_model(name)
    streamed = []
    # 7 prompt tokens + 20 new: the prefill bucket (16) is smaller than the cache (32) and decoding crosses it
    tokens = generate(model, PROMPT, max_new_tokens=20, on_token=streamed.append)
    assert is_greedy_continuation(model, PROMPT, tokens)
    assert streamed == tokens and len(set(tokens)) > 2  # not a degenerate constant output
    # eos stops before the stop token, which is neither returned nor streamed
    stop_at = next(i for i, t in enumerate(tokens) if t not in tokens[:i] and i >= 2)
    assert generate(model, PROMPT, max_new_tokens=20, eos_id=[63, tokens[stop_at]]) == tokens[:stop_at]


@pytest.mark.parametrize("name", ["qwen2_bias_gqa", "deepseek_v3"])
def test_cached_decode_logits_equal_full_forward(name, tiny_model):
    model = tiny_model(name)
    ids = jnp.asarray([PROMPT + [1, 2, 3, 4, 5]])
    full = model(ids)
    decode = nnx.jit(lambda m, tokens, cache, index: m.decode(tokens, cache, index))
    logits, cache = decode(model, ids[:, :7], model.init_cache(1, 16), 0)  # prefill, then one token at a time
    steps = [logits]
    for i in range(7, ids.shape[1]):
        logits, cache = decode(model, ids[:, i:i + 1], cache, jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5 * float(abs(full).max()))


@pytest.mark.parametrize("family", ["llama", "qwen2", "deepseek_v3", "deepseek_v3_qlora", "deepseek_v3_yarn"])
def test_greedy_matches_transformers_generate(family, tmp_path, reference_model):
    ref = reference_model(family)
    ref.generation_config.eos_token_id = None  # run the full length on both sides
    ref.generation_config.pad_token_id = 0
    ref.save_pretrained(tmp_path)
    model, _ = load_hf_checkpoint(tmp_path)
    prompt = [3, 14, 15, 92, 65, 35]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0, len(prompt):]
    assert generate(model, prompt, max_new_tokens=12) == expected.tolist()
    if family.startswith("deepseek"):  # the recompute path (what the latent cache replaced) agrees too
        assert generate(model, prompt, max_new_tokens=12, cache=False) == expected.tolist()


def test_sampling_is_deterministic_and_tiny_top_p_is_greedy(tiny_model):
    model = tiny_model("llama_gqa")
    greedy = generate(model, PROMPT, max_new_tokens=12)
    assert generate(model, PROMPT, max_new_tokens=12, temperature=1.0, top_p=1e-6, rng=jax.random.key(3)) == greedy
    hot = dict(max_new_tokens=12, temperature=2.0, top_p=0.99)
    first = generate(model, PROMPT, rng=jax.random.key(7), **hot)
    assert generate(model, PROMPT, rng=jax.random.key(7), **hot) == first
    assert generate(model, PROMPT, rng=jax.random.key(8), **hot) != first != greedy


P = np.asarray([0.15, 0.5, 0.05, 0.3])  # unsorted on purpose: the nucleus is found by sorting


@pytest.mark.parametrize("temperature,top_p,expected", [
    (1.0, 0.7, [0, 0.625, 0, 0.375]),   # mass before token 0 (third most likely) is 0.8 >= 0.7: nucleus {1, 3}
    (1.0, 0.85, [0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95]),
    (2.0, 1.0, np.sqrt(P) / np.sqrt(P).sum()),  # temperature 2: p^(1/2), renormalised
])
def test_nucleus_sampling_distribution(temperature, top_p, expected):
    logits = jnp.log(jnp.asarray(P))
    draw = jax.jit(jax.vmap(lambda k: sample_token(logits, k, temperature, top_p, greedy=False)))
    counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), 40_000))), minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.01)
    assert all(counts[np.asarray(expected) == 0] == 0)  # outside the nucleus: never drawn


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ZEPHYR_LIKE = ("{{ bos_token }}{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
               "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% else %}\n"
               "{{ '<|assistant|>\n' + message['content'] + eos_token }}\n{% endif %}\n{% endfor %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]


def test_render_chat_default_template_and_transformers_parity():
    assert render_chat(MESSAGES[1:2]) == "<|user|>\nhi\n<|assistant|>\n"
    assert render_chat(MESSAGES[1:3], add_generation_prompt=False, eos_token="</s>") == (
        "<|user|>\nhi</s>\n<|assistant|>\nhello</s>\n")
    from tokenizers import Tokenizer, models

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1},
                                                                                          unk_token="<s>")),
                                              bos_token="<s>", eos_token="</s>")
    for template in (CHATML, ZEPHYR_LIKE, DEFAULT_CHAT_TEMPLATE):
        for gen in (True, False):
            ours = render_chat(MESSAGES, template, gen, bos_token="<s>", eos_token="</s>")
            assert ours == hf.apply_chat_template(MESSAGES, chat_template=template, tokenize=False,
                                                  add_generation_prompt=gen)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, reference_model):
    """A tiny Llama checkpoint with a word-level tokenizer.json and a chat template (as on the hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("hf")
    ref = reference_model("llama")
    ref.config.eos_token_id = 2
    ref.save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}w{{ 10 if m['role'] == 'user' else 11 }} {{ m['content'] }} {% endfor %}w12"
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}))
    return path


def test_cli_streams_the_continuation(hf_dir, capsys):
    tokenizer = HFTokenizer.from_checkpoint(hf_dir)
    assert tokenizer.stop_ids == [2] and tokenizer.chat_template.startswith("{% for")
    main([str(hf_dir), "--prompt", "w5 w17 w3 w42", "--max-new-tokens", "9"])
    # the reference: transformers' greedy generate on the same checkpoint, stopping at the same eos
    prompt = tokenizer.encode("w5 w17 w3 w42", add_special_tokens=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False, eos_token_id=2, pad_token_id=0)
    new = [t for t in out[0, len(prompt):].tolist() if t != 2][:9]
    assert len(new) >= 3
    assert capsys.readouterr().out == tokenizer.decode(prompt + new) + "\n"


def test_chat_keeps_history(hf_dir, monkeypatch, capsys):
    model, _ = load_hf_checkpoint(hf_dir)
    tokenizer = HFTokenizer.from_checkpoint(hf_dir)
    out = io.StringIO()
    messages = chat(model, tokenizer, ["w5 w6\n", "\n", "w7\n"], template=tokenizer.chat_template, out=out,
                    max_new_tokens=5)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    for turn in (1, 3):  # each reply continues the rendered history so far (the second sees the first reply)
        prompt = tokenizer.encode(render_chat(messages[:turn], tokenizer.chat_template), add_special_tokens=False)
        assert messages[turn]["content"] == tokenizer.decode(generate(model, prompt, max_new_tokens=5, eos_id=[2]))
    assert out.getvalue() == "".join(m["content"] + "\n" for m in messages[1::2])
    monkeypatch.setattr(sys, "stdin", io.StringIO("w5 w6\nw7\n"))  # the CLI path reads the same turns
    main([str(hf_dir), "--chat", "--max-new-tokens", "5"])
    assert capsys.readouterr().out == out.getvalue()
