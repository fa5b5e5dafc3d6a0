"""`fastppo sft`: loss on response tokens only, loss falls, the export reloads, bad configs fail clearly."""

import json

import pytest
import torch

from fastppo import algo
from fastppo.demos import synthetic as S
from fastppo.cli import main
from fastppo.config import ConfigError, SFTConfig, load_config
from fastppo.data import collate_sft, load_sft
from fastppo.models import IGNORE_INDEX
from fastppo.models import ptx_loss


def make_init(root, *, hidden=32, seed=0):
    """The synthetic tokenizer and a random tiny Llama saved as a HF directory."""
    from transformers import LlamaForCausalLM

    tok = S.build_tokenizer(root)
    torch.manual_seed(seed)
    LlamaForCausalLM(S.tiny_llama_config(len(tok), hidden_size=hidden, layers=2, heads=4)).save_pretrained(root)
    return tok


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_sft_cli_loss_falls_and_export_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_init(tmp_path / "init")
    data = S.write_jsonl(tmp_path / "sft.jsonl", S.make_sft_data(400, seed=1))
    out = tmp_path / "run"
    rc = main(["sft", f"model.path={tmp_path / 'init'}", f"data.train_path={data}", f"run.output_dir={out}",
               "optim.lr=3e-3", "run.batch_size=16", "run.micro_batch_size=8", "run.max_steps=40",
               "run.eval_every=20", "data.eval_fraction=0.1", "run.device=cpu", "run.progress_bar=false"])
    assert rc == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert len(records) == 40 and records[-1]["iteration"] == 40
    first, last = records[0]["loss/sft"], sum(r["loss/sft"] for r in records[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < first
    assert (out / "config.yaml").exists() and any((out / "tensorboard").iterdir())

    # The export is a plain HF causal LM + tokenizer, and it learned the task's format.
    model = AutoModelForCausalLM.from_pretrained(out / "export").eval()
    tok = AutoTokenizer.from_pretrained(out / "export")
    ids = tok("describe the red fox :", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.convert_ids_to_tokens(nxt) == "the"  # every SFT response starts with "the"


def test_sft_loss_covers_response_tokens_only(tmp_path):
    """The stage's loss equals cross-entropy over the response (+ EOS) tokens, prompt tokens excluded."""
    from transformers import AutoModelForCausalLM

    tok = make_init(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    rows = S.make_sft_data(6, seed=3)
    data = S.write_jsonl(tmp_path / "sft.jsonl", rows)
    examples = load_sft(data, tok, prompt_field="prompt", response_field="response", messages_field="messages",
                        max_len=64)
    batch = collate_sft(examples, tok.pad_token_id)
    loss = ptx_loss(model, batch, fused=True, backend=None, chunk_size=None)

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    manual, n = 0.0, 0
    for i, row in enumerate(rows):
        p = tok(row["prompt"])["input_ids"]
        r = tok(row["response"])["input_ids"] + [tok.eos_token_id]
        for j, target in enumerate(r):
            manual -= algo.token_logprobs(logits[i, len(p) + j - 1], torch.tensor(target)).logprobs.item()
            n += 1
    assert (batch.labels != IGNORE_INDEX).sum().item() == n
    assert loss.item() == pytest.approx(manual / n, rel=1e-4)


def test_sft_on_chat_messages(tmp_path):
    tok = make_init(tmp_path / "init")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                         "{% if add_generation_prompt %}assistant :{% endif %}")
    tok.save_pretrained(tmp_path / "init")
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in S.make_sft_data(40, seed=2)]
    data = S.write_jsonl(tmp_path / "chat.jsonl", rows)
    from fastppo.sft import sft

    cfg = load_config(schema=SFTConfig, overrides=[f"model.path={tmp_path / 'init'}", f"data.train_path={data}",
                                                  f"run.output_dir={tmp_path / 'run'}", "run.max_steps=3",
                                                  "run.batch_size=8", "run.device=cpu", "run.progress_bar=false"])
    result = sft(cfg)
    assert (result.export_dir / "model.safetensors").exists()
    assert result.eval_metrics["eval/tokens"] > 0


def test_sft_bad_config_names_the_field(tmp_path, capsys):
    with pytest.raises(ConfigError, match="run.micro_batch_size"):
        load_config(schema=SFTConfig, overrides=["model.path=x", "data.train_path=y", "run.batch_size=10",
                                                "run.micro_batch_size=3"])
    with pytest.raises(ConfigError, match="model.path"):
        load_config(schema=SFTConfig, overrides=["data.train_path=y"])
    assert main(["sft", "model.path=x", "data.train_path=y", "optim.bogus=1"]) == 2
    assert "optim.bogus" in capsys.readouterr().err


@pytest.mark.parametrize("packed", [False, True])
def test_fused_lm_loss_is_the_loss_form_and_equals_full_logits(tmp_path, monkeypatch, packed):
    """ptx_loss (SFT, the reward model's LM term, PPO's ptx term) with fused=True runs the loss form
    `linear_logprob_loss` (gradients computed with the loss: no `linear_token_logprobs`, whose backward
    recomputes the logits) and gives the full-logits path's loss and gradients, to float32 rounding."""
    import fastppo.models as models_module
    from transformers import AutoModelForCausalLM

    tok = make_init(tmp_path)
    rows = S.make_sft_data(6, seed=3)
    examples = load_sft(S.write_jsonl(tmp_path / "sft.jsonl", rows), tok, prompt_field="prompt",
                        response_field="response", messages_field="messages", max_len=64)
    batch = collate_sft(examples, tok.pad_token_id)
    calls = []
    real = models_module.linear_logprob_loss
    monkeypatch.setattr(models_module, "linear_logprob_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(models_module, "linear_token_logprobs", None)          # must not be reached
    results = {}
    for fused in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tmp_path)
        loss = ptx_loss(model, batch, fused=fused, backend=None, chunk_size=None, packed=packed)
        loss.backward()
        results[fused] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    assert calls == [1]
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, atol=1e-6 * max(1.0, b.abs().max().item()), rtol=1e-4)
