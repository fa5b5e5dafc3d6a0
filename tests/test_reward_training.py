"""`fastppo train-rm`: EOS-scored pairs, loss falls, held-out accuracy above chance on the synthetic rule,
the export reloads as the reward model and critic of `fastppo train`."""

import json

import pytest
import torch

from fastppo.demos import synthetic as S
from fastppo.cli import main
from fastppo.config import ConfigError, ModelConfig, RMConfig, load_config
from fastppo.data import DataError
from fastppo.models import load_models, score_at
from fastppo.reward_training import collate_pairs, evaluate_rm, load_pairs, train_rm


def make_init(root, *, hidden=32, seed=0):
    from transformers import LlamaForCausalLM

    tok = S.build_tokenizer(root)
    torch.manual_seed(seed)
    LlamaForCausalLM(S.tiny_llama_config(len(tok), hidden_size=hidden, layers=2, heads=4)).save_pretrained(root)
    return tok


def test_pairs_end_with_eos_and_score_there(tmp_path):
    tok = S.build_tokenizer()
    rows = [{"prompt": "describe the red fox :", "chosen": "the red fox is kind .", "rejected": "the red fox is big and old and slow ."},
            {"prompt": "tell me about the blue owl :", "chosen": "the blue owl is calm and brave . it sings .",
             "rejected": "the blue owl is small ."}]
    path = S.write_jsonl(tmp_path / "p.jsonl", rows)
    pairs = load_pairs(path, tok, prompt_field="prompt", chosen_field="chosen", rejected_field="rejected", max_len=64)
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert batch.input_ids.shape[0] == 4
    rows_ids = batch.input_ids[torch.arange(4), batch.eos_index]
    assert (rows_ids == tok.eos_token_id).all()
    # right padding after EOS, and the chosen rows' LM labels cover exactly the response + EOS
    assert batch.attention_mask.sum(-1).tolist() == (batch.eos_index + 1).tolist()
    n_resp = len(tok("the red fox is kind .")["input_ids"]) + 1
    assert (batch.lm_labels[0] != -100).sum().item() == n_resp
    # cut to max_len: the prompt loses tokens first and the last token is still EOS
    short = load_pairs(path, tok, prompt_field="prompt", chosen_field="chosen", rejected_field="rejected", max_len=8)
    assert all(len(p.chosen) <= 8 and p.chosen[-1] == tok.eos_token_id and p.rejected[-1] == tok.eos_token_id
               for p in short)


def test_pairs_from_chat_messages_and_bad_records(tmp_path):
    tok = S.build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    user = {"role": "user", "content": "describe the red fox :"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "the red fox is kind ."}],
             "rejected": [user, {"role": "assistant", "content": "the red fox is big ."}]}]
    pairs = load_pairs(S.write_jsonl(tmp_path / "c.jsonl", rows), tok, prompt_field="prompt", chosen_field="chosen",
                       rejected_field="rejected", max_len=64)
    assert pairs[0].n_prompt == len(tok("describe the red fox :")["input_ids"])
    bad = S.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "describe the red fox :", "chosen": "the red fox ."}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'rejected'"):
        load_pairs(bad, tok, prompt_field="prompt", chosen_field="chosen", rejected_field="rejected", max_len=64)


def test_train_rm_learns_the_rule_and_export_loads_as_reward_and_critic(tmp_path):
    from transformers import AutoModelForSequenceClassification

    make_init(tmp_path / "init")
    train = S.write_jsonl(tmp_path / "pairs.jsonl", S.make_preference_data(640, seed=1))
    held_out = S.write_jsonl(tmp_path / "eval.jsonl", S.make_preference_data(200, seed=2, split="eval"))
    out = tmp_path / "rm"
    rc = main(["train-rm", f"model.path={tmp_path / 'init'}", f"data.train_path={train}", f"data.eval_path={held_out}",
               f"run.output_dir={out}", "optim.lr=2e-3", "run.batch_size=32", "run.micro_batch_size=16",
               "run.epochs=2", "run.eval_every=10", "run.device=cpu", "run.progress_bar=false"])
    assert rc == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [r["loss/total"] for r in records]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    final = records[-1]
    assert final["eval/accuracy"] > 0.75, final  # chance is 0.5
    assert final["eval/margin"] > 0

    # The export is a seq-cls model with one label whose EOS scores reproduce the logged accuracy.
    tok = S.build_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(out / "export").eval()
    assert model.config.num_labels == 1
    pairs = load_pairs(held_out, tok, prompt_field="prompt", chosen_field="chosen", rejected_field="rejected", max_len=64)
    again = evaluate_rm(model, pairs, pad_id=tok.pad_token_id, batch_size=64, device=torch.device("cpu"))
    assert again["eval/accuracy"] == pytest.approx(final["eval/accuracy"])

    # `fastppo train` loads it as reward model and critic, next to the causal LM it started from.
    models = load_models(ModelConfig(policy_path=str(tmp_path / "init"), reward_path=str(out / "export")),
                         torch.device("cpu"))
    batch = collate_pairs(pairs[:4], tok.pad_token_id)
    with torch.no_grad():
        r = score_at(models.reward, batch.input_ids, batch.attention_mask, batch.eos_index)
        c = score_at(models.critic, batch.input_ids, batch.attention_mask, batch.eos_index)
        expected = score_at(model, batch.input_ids, batch.attention_mask, batch.eos_index)
    torch.testing.assert_close(r, expected)
    torch.testing.assert_close(c, expected)


def test_train_rm_with_lm_loss_on_chosen(tmp_path):
    make_init(tmp_path / "init")
    train = S.write_jsonl(tmp_path / "pairs.jsonl", S.make_preference_data(64, seed=1))
    cfg = load_config(schema=RMConfig, overrides=[
        f"model.path={tmp_path / 'init'}", f"data.train_path={train}", f"run.output_dir={tmp_path / 'rm'}",
        "loss.lm_coef=0.5", "loss.margin_reg=0.01", "run.max_steps=6", "run.batch_size=16", "run.micro_batch_size=8",
        "optim.lr=2e-3", "run.device=cpu", "run.progress_bar=false"])
    result = train_rm(cfg)
    lm = [h["loss/lm"] for h in result.history]
    assert all(v > 0 for v in lm) and lm[-1] < lm[0]
    # the LM head is not part of the export: a plain sequence-classification directory
    from safetensors import safe_open

    with safe_open(str(result.export_dir / "model.safetensors"), "pt") as f:
        assert not any("lm_head" in k for k in f.keys())


def test_train_rm_config_errors():
    with pytest.raises(ConfigError, match="loss.lm_coef"):
        load_config(schema=RMConfig, overrides=["model.path=x", "data.train_path=y", "loss.lm_coef=-1"])
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        load_config(schema=RMConfig, overrides=["model.path=x", "data.train_path=y", "data.eval_fraction=1.5"])
