"""Supervised fine-tuning: chat parsing errors, assistant-only loss masks, packing isolation, a tiny run that lowers
the held-out assistant loss, exact resume, and the Hugging Face round trip (export, reload, fine-tune from it)."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.data.chat import ChatError, ChatFormat, pack_conversations, read_chat_jsonl
from train.config import load_config
from train.data import ByteTokenizer
from train.models import build_model, model_config_from_dict
from train.sft import load_init, main, sft
from train.step import cross_entropy

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=32", "model.intermediate_size=64", "seq_len=128", "global_batch=8",
         "log.eval_batches=2", "log.tensorboard=false", "log.sample_tokens=0", "schedule.warmup_steps=3",
         "mesh.data=1", "optimizer.learning_rate=0.02",
         # constant after the warmup: unlike cosine it does not depend on `steps`, so runs of every length
         # (> warmup) share one compiled step (tests/conftest.py: SMALL_TRAINER)
         "schedule.name=constant"]
BYTE = ByteTokenizer()
BYTE_CHAT = ChatFormat(BYTE.encode, BYTE.eos_id, "<|endoftext|>")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"},
                {"role": "assistant", "content": "6."}]


def config(run_dir, *overrides):
    return load_config(ROOT / "configs" / "sft_tiny.yaml", [*SMALL, f"run_dir={run_dir}", *overrides])


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- reading

def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"messages": CONVERSATION[1:3]})


def test_bad_lines_unknown_roles_and_missing_replies_are_reported(tmp_path, capsys):
    bad = write_lines(tmp_path / "bad.jsonl", GOOD, "{not json", "", json.dumps({"messages": [{"role": "user"}]}),
                      json.dumps({"messages": CONVERSATION[:2]}), GOOD)
    with pytest.raises(ChatError, match=r"bad\.jsonl:2: not valid JSON"):
        read_chat_jsonl(bad)
    conversations, counts = read_chat_jsonl(bad, skip_bad_lines=True)
    assert counts == {"bad_lines": 2, "no_assistant": 1}
    assert [c.where for c in conversations] == [f"{bad}:1", f"{bad}:6"]

    tool = write_lines(tmp_path / "tool.jsonl", GOOD, GOOD, json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]}))
    with pytest.raises(ChatError, match=r"tool\.jsonl:3: message 1 has unknown role 'tool'"):
        read_chat_jsonl(tool, skip_bad_lines=True)  # a schema error, never skipped
    # the CLI stops before any training with the same message and exit status 2
    assert main(["--config", str(ROOT / "configs" / "sft_tiny.yaml"), f"run_dir={tmp_path / 'run'}",
                 f"sft.train_file={tool}", "log.tensorboard=false"]) == 2
    assert "tool.jsonl:3: message 1 has unknown role 'tool'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- masks

def reply_ids(ids, mask):
    return ids[mask].tolist()


def test_only_assistant_replies_and_their_end_of_turn_are_trained():
    ids, mask = BYTE_CHAT.tokenize(CONVERSATION)
    assert reply_ids(ids, mask) == BYTE.encode("4.") + [256] + BYTE.encode("6.") + [256]
    # the unmasked rest is exactly the prompt text the model sees at inference (eos ids where the template has them)
    text = BYTE_CHAT.render(CONVERSATION, False)
    assert ids.tolist() == BYTE_CHAT.encode_text(text) and (ids == 256).sum() == 5

    chatml = ChatFormat(BYTE.encode, 256, "<|im_end|>", template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    ids, mask = chatml.tokenize(CONVERSATION)
    assert reply_ids(ids, mask) == BYTE.encode("4.") + [256] + BYTE.encode("6.") + [256]

    unstable = ChatFormat(BYTE.encode, 256, "", template="{{ messages | length }}{% for m in messages %}"
                                                         "{{ m['content'] }}{% endfor %}")
    with pytest.raises(ChatError, match="x.jsonl:7: the chat template does not render this conversation turn"):
        unstable.tokenize(CONVERSATION, "x.jsonl:7")


def conversations():
    qa = [("What is 7 x 8?", "7 x 8 = 56."), ("Capital of Peru?", "Lima."), ("Define a verb.", "An action word."),
          ("Who is Puck?", "A fairy in A Midsummer Night's Dream.")]
    return [BYTE_CHAT.tokenize([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in qa]


@pytest.fixture(scope="session")
def packed():
    """Four conversations packed into row 0, and each alone in rows 1-4 (right-padded: causal attention never
    sees the padding); `loss_and_logits(params, targets)` is the trainer's loss over all rows, jitted once."""
    examples = conversations()  # 48-76 tokens, replies start at token 37-41
    lengths = [len(ids) - 1 for ids, _ in examples]
    rows, stats = pack_conversations(examples, seq_len=sum(lengths) + 3)
    alone = {k: np.zeros((len(examples), v.shape[1]), v.dtype) for k, v in rows.items()}
    for k, (ids, reply) in enumerate(examples):
        n = lengths[k]
        alone["inputs"][k, :n], alone["targets"][k, :n], alone["loss_mask"][k, :n] = ids[:-1], ids[1:], reply[1:]
        alone["segment_ids"][k], alone["positions"][k] = 1, np.arange(alone["positions"].shape[1])
    batch = {k: jnp.asarray(np.concatenate([rows[k], alone[k]])) for k in rows}
    cfg = model_config_from_dict({"model_type": "llama", "vocab_size": 257, "hidden_size": 32, "intermediate_size": 64,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "max_position_embeddings": 256})
    graphdef, params, rest = nnx.split(build_model(cfg, rngs=nnx.Rngs(params=0)), nnx.Param, ...)

    def loss(params, targets):
        logits = nnx.merge(graphdef, params, rest)(batch["inputs"], batch["segment_ids"], batch["positions"])
        return cross_entropy(logits, targets, batch["loss_mask"], 0.0)[0], logits

    return examples, rows, stats, batch, params, jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_packing_never_lets_attention_cross_conversations_and_reports_truncation(packed):
    examples, rows, stats, batch, params, loss_and_grad = packed
    lengths = [len(ids) - 1 for ids, _ in examples]
    assert stats["rows"] == 1 and stats["truncated"] == 0
    assert sorted(np.bincount(rows["segment_ids"][0])[1:].tolist()) == sorted(lengths)
    (_, logits), _ = loss_and_grad(params, batch["targets"])
    for k, n in enumerate(lengths):
        np.testing.assert_allclose(logits[0, rows["segment_ids"][0] == k + 1], logits[1 + k, :n], atol=1e-5, rtol=1e-5)

    # seq_len=40 keeps 41 tokens: 2, 0, 2 and 4 reply targets; the one with none left is dropped, all are counted
    _, stats = pack_conversations(examples, seq_len=40)
    assert (stats["truncated"], stats["dropped"], stats["rows"], stats["reply_tokens"]) == (4, 1, 3, 8)


def test_loss_and_gradients_ignore_prompt_targets_but_not_reply_targets(packed):
    _, rows, _, batch, params, loss_and_grad = packed
    (base, _), grads = loss_and_grad(params, batch["targets"])
    prompt = np.flatnonzero((rows["loss_mask"][0] == 0) & (rows["segment_ids"][0] > 0))
    reply = np.flatnonzero(rows["loss_mask"][0] == 1)
    assert len(prompt) > 100 and len(reply) > 50
    # every system/user/header target of the packed row changed: not a bit of the loss or gradient moves
    changed = batch["targets"].at[0, prompt].set((batch["targets"][0, prompt] + 1) % 257)
    (same, _), same_grads = loss_and_grad(params, changed)
    assert same == base
    jax.tree.map(np.testing.assert_array_equal, same_grads, grads)
    (other, _), _ = loss_and_grad(params, batch["targets"].at[0, reply[3]].add(1))
    assert abs(float(other - base)) > 1e-4


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="session")
def straight(tmp_path_factory):
    """A 16-step fine-tuning run, checkpointed at 8 and 16 and exported: (run_dir, summary, stdout). Session-scoped,
    so a worker computes it once however the tests that read it are scheduled."""
    run_dir, out = tmp_path_factory.mktemp("sft") / "straight", io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = sft(config(run_dir, "steps=16", "log.every=4", "log.eval_every=8", "checkpoint.every=8",
                             "log.sample_tokens=8"))
    return run_dir, summary, out.getvalue()


def test_tiny_sft_lowers_held_out_assistant_loss(straight):
    run_dir, summary, straight_output = straight
    assert summary["initial_val_loss"] > 5.0                          # byte-level random init: ~ln(257)
    assert summary["val_loss"] < summary["initial_val_loss"] - 2.0, summary
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if "val_loss" in r] == [8, 16] and rows[-1]["loss"] < rows[0]["loss"]
    chat = summary["chat"]
    # seq_len=128 cuts the longest conversations: counted (and printed), not silent; one keeps no reply at all
    assert chat["train"]["truncated"] > 0 and chat["train"]["dropped"] + chat["val"]["dropped"] == 1
    assert chat["train"]["conversations"] + chat["val"]["conversations"] == 288 - 1
    assert f"truncated to seq_len=128: {chat['train']['truncated'] + chat['val']['truncated']}" in straight_output
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [8, 16]
    assert isinstance(summary["sample"], str)


def test_resume_continues_exactly(straight, tmp_path):
    """Continue a copy of the straight run from its step-8 checkpoint, as after a preemption at step 8."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(straight[0], run_dir, ignore=shutil.ignore_patterns("16", "hf"))
    rows = metrics(run_dir)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 8))
    common = ["steps=16", "log.every=4", "log.eval_every=8", "checkpoint.every=8"]
    summary = sft(config(run_dir, *common))
    assert summary["start_step"] == 8 and "initial_val_loss" not in summary
    assert [r["step"] for r in metrics(run_dir)] == [4, 8, 12, 16]
    after = lambda d: {r["step"]: (r["loss"], r.get("val_loss")) for r in metrics(d) if r["step"] > 8}
    assert after(run_dir) == after(straight[0])  # bit for bit on CPU, validation included
    with pytest.raises(ValueError, match="sft.train_file"):
        sft(config(run_dir, *common, f"sft.train_file={ROOT / 'train' / 'corpora' / 'chat_tiny.jsonl'}"))


def test_hf_export_round_trip_and_fine_tuning_from_it(straight, tmp_path):
    from train.data import HFTokenizer
    from train.models.hf import load_hf_checkpoint
    from train.pretrained import load_run_dir

    run_dir, summary, _ = straight
    export = Path(summary["export_hf"])
    assert export == run_dir / "hf"
    ours, _ = load_run_dir(run_dir)
    theirs, _ = load_hf_checkpoint(export)
    tokens = jnp.asarray([BYTE_CHAT.encode_text("<|user|>\nWhat is 2 + 2?<|endoftext|>\n<|assistant|>\n")])
    np.testing.assert_array_equal(theirs(tokens), ours(tokens))
    hf = HFTokenizer.from_checkpoint(export)  # what `python -m train.generate DIR --chat` uses
    text = "Ünïcode ✓ <|endoftext|>\n"
    assert hf.encode(text, add_special_tokens=False) == BYTE_CHAT.encode_text(text) and hf.stop_ids == [256]
    assert "<|assistant|>" in hf.chat_template

    # fine-tuning from the export starts where the straight run ended (weights, tokenizer and template carried over)
    again = sft(config(tmp_path / "from_hf", "steps=4", f"sft.init_from={export}"))
    assert again["initial_val_loss"] == pytest.approx(summary["val_loss"], abs=1e-4)
    saved = load_config(tmp_path / "from_hf" / "config.yaml")
    assert saved.model == ours.config.to_dict() and saved.data.tokenizer == str(export.resolve())
    # so does fine-tuning from the run_dir: its model, and its tokenizer config in the new run's config
    init = load_init(config(tmp_path / "from_run", f"sft.init_from={run_dir}"))
    assert init.run_dir == run_dir and init.cfg.model == ours.config.to_dict()
    assert init.cfg.data == load_config(run_dir / "config.yaml").data
    again = sft(config(tmp_path / "from_run", "steps=4", f"sft.init_from={run_dir}"))
    assert again["initial_val_loss"] == pytest.approx(summary["val_loss"], abs=1e-4)
    assert (init.chat.eos_id, init.chat.eos_token, init.chat.template) == (256, "<|endoftext|>", None)


@pytest.mark.slow
def test_two_processes_fine_tune_and_export_as_one(straight, tmp_path, free_port, cpu_env):
    """`python -m train.sft` from a Hugging Face dir on 2 CPU processes × 1 device (jax.distributed on localhost)
    == 1 process × 2 devices: the same losses, and the same exported weights (gathered to process 0, written once)."""
    import subprocess
    import sys

    from safetensors.numpy import load_file

    export = straight[1]["export_hf"]
    common = [*SMALL, "mesh.data=-1", "steps=4", "log.every=1", "log.eval_every=1000", "checkpoint.every=1000",
              f"sft.init_from={export}"]

    def start(name, devices, *args):
        return subprocess.Popen([sys.executable, "-m", "train.sft", f"run_dir={tmp_path / name}", *common, *args],
                                env=cpu_env(devices), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start("one", 2)] + [start("two", 1, "--coordinator", f"127.0.0.1:{free_port}", "--num-processes", "2",
                                       "--process-id", str(i)) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path / "two")],
                               [r["loss"] for r in metrics(tmp_path / "one")], rtol=1e-5)
    one, two = (load_file(tmp_path / name / "hf" / "model.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert "exported to" in outs[1][0] and "exported to" not in outs[2][0]  # process 1 writes nothing
