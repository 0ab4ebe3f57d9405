"""A Moonlight-format checkpoint directory, made here: config.json with Moonlight's keys and auto_map, safetensors,
`tiktoken.model` (the first 512 ranks of the bundled GPT-2 file: a prefix of a rank list is itself a valid BPE)
and tokenizer_config.json with Moonlight's special-token layout and chat template. Tokenization against tiktoken
driven by the reference algorithm, chat rendering against jinja2, and the whole path: SFT with Muon -> export ->
reload by us and by transformers -> greedy generation equal to transformers'."""
import base64
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
N_RANKS = 512
# Moonlight's added_tokens_decoder, as offsets after the ranks (163584 + k there)
SPECIAL = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
           6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 17: "<|im_middle|>"}
# The Kimi chat template (Moonlight-16B-A3B-Instruct's tokenizer_config.json was not among the public sources
# reachable here; this is the template of its sibling Kimi-VL-A3B-Instruct, same special tokens and turn layout,
# as llama-cpp-python's KimiVLChatHandler copies it from that model's chat_template.jinja, text parts only).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>{%- endif -%}"
    "{%- if message['role'] == 'user' -%}<|im_user|>{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}<|im_assistant|>{%- endif -%}"
    "{{ message['role'] }}<|im_middle|>{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}")
AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
MOONLIGHT_KEYS = {"aux_loss_alpha": 0.001, "ep_size": 1, "seq_aux": True, "topk_method": "noaux_tc",
                  "scoring_func": "sigmoid", "norm_topk_prob": True, "moe_layer_freq": 1, "rope_scaling": None,
                  "num_nextn_predict_layers": 0, "auto_map": AUTO_MAP}
# The reference's pre-tokenizer (tokenization_moonshot.py / tokenization_kimi.py pat_str), written out here
# independently of train/data/tokenizers.py
REFERENCE_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
TEXT = ("Muon's update is orthogonalised; it's fast.\n\n  月之暗面的Moonlight模型：中文English混合，数字12345678。\n"
        "def f(x):\n\tfor i in range(10):\n        x += i ** 2  # 3.14159\n    return x\r\n"
        "   trailing spaces   \n\n\n" + "".join(SPECIAL.values()) + "<|reserved_token_517|> done")


def write_moonlight_dir(path: Path, model) -> Path:
    """Save `model` (a transformers DeepseekV3ForCausalLM) in Moonlight's directory format."""
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(MOONLIGHT_KEYS, architectures=["DeepseekV3ForCausalLM"], bos_token_id=N_RANKS,
                  eos_token_id=N_RANKS + 1)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": N_RANKS + 2}))  # <|im_end|>
    for file in ("configuration_deepseek.py", "modeling_deepseek.py", "tokenization_moonshot.py"):
        (path / file).write_text("# remote code stand-in: read, never run\n")
    lines = (ROOT / "train" / "corpora" / "gpt2.tiktoken").read_text().splitlines()[:N_RANKS]
    assert all(int(line.split()[1]) < N_RANKS for line in lines)
    (path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    decoder = {str(N_RANKS + k): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True} for k, name in SPECIAL.items()}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder, "additional_special_tokens": list(SPECIAL.values())[2:],
        "auto_map": {"AutoTokenizer": ["tokenization_moonshot.TikTokenTokenizer", None]},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[EOS]", "unk_token": "[EOS]",
        "chat_template": CHAT_TEMPLATE, "tokenizer_class": "TikTokenTokenizer", "model_max_length": 8192}))
    return path


def reference_encoding(path: Path):
    """tokenization_moonshot.py's encoder rebuilt with tiktoken: ranks, then 256 special slots named from
    added_tokens_decoder (else <|reserved_token_{i}|>), encode(..., allowed_special="all")."""
    import tiktoken

    ranks = {base64.b64decode(tok): int(rank) for tok, rank in
             (line.split() for line in (path / "tiktoken.model").read_text().splitlines() if line)}
    added = {int(i): t["content"] for i, t in
             json.loads((path / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()}
    special = {added.get(i, f"<|reserved_token_{i}|>"): i for i in range(len(ranks), len(ranks) + 256)}
    return tiktoken.Encoding("reference", pat_str=REFERENCE_PATTERN, mergeable_ranks=ranks, special_tokens=special)


@pytest.fixture(scope="session")  # session: the slow test that reads it runs first (tests/conftest.py)
def moonlight_dir(tmp_path_factory, reference_model):
    return write_moonlight_dir(tmp_path_factory.mktemp("moonlight"), reference_model("moonlight_tiny"))


def test_tokenization_equals_reference(moonlight_dir):
    from train.data import load_tokenizer
    from train.config import DataConfig

    ours = load_tokenizer(DataConfig(tokenizer=str(moonlight_dir)), moonlight_dir)
    reference = reference_encoding(moonlight_dir)
    ids = ours.encode(TEXT)
    assert ids == reference.encode(TEXT, allowed_special="all")
    assert {N_RANKS + k for k in SPECIAL} | {517} <= set(ids)  # every special token came out as one id
    # Han runs are pre-tokens of their own (the Kimi pattern), unlike GPT-2's pattern
    assert reference.encode("中文English") == reference.encode("中文") + reference.encode("English")
    ours.skip_special_tokens = False
    assert ours.decode(ids) == TEXT
    assert (ours.vocab_size, ours.eos_id, ours.stop_ids) == (768, N_RANKS + 1, [N_RANKS + 1, N_RANKS + 2])
    long_run = "x" * 30_000 + " " * 30_000  # split into <= 25k runs first, as the reference does
    assert ours.decode(ours.encode(long_run)) == long_run


def test_chat_rendering_equals_jinja2(moonlight_dir):
    import jinja2

    from train.data.chat import render_chat
    from train.pretrained import load_hf_dir

    _, tokenizer = load_hf_dir(moonlight_dir)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "2+2?"}]
    expected = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=True, bos_token="[BOS]", eos_token="[EOS]")
    ours = render_chat(messages, tokenizer.chat_template, True, bos_token=tokenizer.bos_token,
                       eos_token=tokenizer.eos_token)
    assert ours == expected and ours.endswith("<|im_assistant|>assistant<|im_middle|>")
    assert tokenizer.encode(ours) == reference_encoding(moonlight_dir).encode(expected, allowed_special="all")


@pytest.mark.slow
def test_sft_export_reload_and_generate(moonlight_dir, tmp_path):
    """SFT 20 Muon steps from the Moonlight-format dir, export, reload (us and transformers without remote code):
    same logits, and greedy tokens equal transformers' generate."""
    from train.config import load_config
    from train.decode import generate
    from train.models.hf import load_hf_checkpoint
    from train.pretrained import load_hf_dir
    from train.sft import sft

    cfg = load_config(ROOT / "configs" / "sft_tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", f"sft.init_from={moonlight_dir}", "steps=20", "seq_len=128",
        "global_batch=8", "log.every=10", "log.eval_every=20", "log.eval_batches=1", "log.tensorboard=false",
        "log.sample_tokens=0", "checkpoint.every=20", "schedule.warmup_steps=3", "mesh.data=1",
        "optimizer.name=muon", "optimizer.learning_rate=0.01"])
    summary = sft(cfg)
    assert summary["steps"] == 20 and summary["val_loss"] < summary["initial_val_loss"]
    out = Path(summary["export_hf"])
    assert (out / "tiktoken.model").read_bytes() == (moonlight_dir / "tiktoken.model").read_bytes()
    exported = json.loads((out / "tokenizer_config.json").read_text())
    source = json.loads((moonlight_dir / "tokenizer_config.json").read_text())
    assert exported == source  # added_tokens_decoder, chat_template, auto_map ... all kept
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert (out / "modeling_deepseek.py").is_file()

    model, tokenizer = load_hf_dir(out)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    prompt = tokenizer.encode(render_prompt(tokenizer, "What is the capital of France?"))
    with torch.no_grad():
        ref_logits = theirs(torch.tensor([prompt])).logits.numpy()
        expected = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, eos_token_id=None,
                                   pad_token_id=0)[0, len(prompt):].tolist()
    ours = np.asarray(model(jnp.asarray([prompt])))
    assert np.abs(ours - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
    assert generate(model, prompt, max_new_tokens=16) == expected
    assert load_hf_checkpoint(moonlight_dir)[1] == load_hf_checkpoint(out)[1]  # same config back


def render_prompt(tokenizer, question):
    from train.data.chat import render_chat
    return render_chat([{"role": "user", "content": question}], tokenizer.chat_template, True)


if __name__ == "__main__":  # `python tests/test_moonlight.py DIR` writes the tiny fixture for the README's commands
    import sys

    from conftest import make_reference_model
    print(write_moonlight_dir(Path(sys.argv[1]), make_reference_model("moonlight_tiny")))
