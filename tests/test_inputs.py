"""Hostile inputs: non-finite rewards, models of the wrong type, broken tokenizers, bad paths and data,
chat prompt files, flash-attn requests, and vocabularies padded for alignment."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import fastppo.groups as groups
from fastppo.demos import synthetic as S
from fastppo.cli import main
from fastppo.checkpoint import export_hf
from fastppo.config import Config, StageModelConfig, load_config
from fastppo.data import DataError, check_tokenizer, load_prompts
from fastppo.experience import drop_rows
from fastppo.shaping import reparameterise_scores
from fastppo.metrics import RunningMoments
from fastppo.models import (EMBEDDING_ROWS_MULTIPLE, ModelError, grow_embeddings, attn_implementation, backbone_states,
                            load_models, load_tokenizer, response_logprobs)
from fastppo.packing import Packing
from fastppo.rollout import Rollout
from fastppo.sft import model_kwargs
from fastppo.train import train
from fastppo_testing.tiny_models import model_configs
from fastppo_testing.trainer import logged, read_metrics, tiny_setups  # noqa: F401  (fixtures)


def cli_error(capsys, argv) -> str:
    """Run the CLI, expect exit status 2 and one line of error; return it."""
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1, err
    return err[0]


# ----------------------------------------------------------------------------
# 1. Non-finite reward-model scores
# ----------------------------------------------------------------------------

def test_nonfinite_scores_stay_out_of_the_running_moments():
    cfg = Config()
    moments = RunningMoments()
    scores = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    shaped = reparameterise_scores(scores, moments, cfg.reward)
    assert moments.count.item() == 2 and moments.mean.item() == 2.0 and moments.var.item() == 1.0
    assert torch.isfinite(shaped).all() and shaped[1] == 0 and shaped[3] == 0
    assert shaped[0] == -cfg.reward.reward_clip and shaped[2] == cfg.reward.reward_clip  # (s - 2) / 1, clipped


def test_dropped_rows_leave_the_response_mask():
    mask = torch.ones(3, 4, dtype=torch.bool)
    ro = Rollout(torch.zeros(3, 6, dtype=torch.long), torch.ones(3, 6, dtype=torch.long), mask,
                 torch.full((3,), 4), torch.ones(3, dtype=torch.bool), 2)
    out = drop_rows(ro, torch.tensor([False, True, False]), pad_id=7)
    assert out.response_mask.sum(-1).tolist() == [4, 0, 4] and ro.response_mask.all()
    # A dropped row's tokens become padding (no forward of the update sees them); the others are untouched.
    assert (out.sequences[1] == 7).all() and (out.sequences[[0, 2]] == 0).all() and (ro.sequences == 0).all()


def _nan_on(monkeypatch, every: int):
    """Make the reward model's score NaN on one call in `every` (forward batches of one row: one row in `every`),
    and on every later call of the same sequences (as a reward model that overflows on them would)."""
    calls, poisoned = [], set()
    real = groups.score_at

    def score_at(model, ids, mask, index, pack=None):
        calls.append(None)
        out = real(model, ids, mask, index, pack)
        rows = [tuple(r) for r in ids.tolist()]
        if (len(calls) - 1) % every == 0:
            poisoned.update(rows)
        return torch.where(torch.tensor([r in poisoned for r in rows]), float("nan"), out)

    monkeypatch.setattr(groups, "score_at", score_at)


def test_one_nan_score_is_dropped_and_never_checkpointed(tiny_setups, tmp_path, monkeypatch):
    setup = tiny_setups("llama")
    out = tmp_path / "run"
    common = {"run.output_dir": out, "rollout.forward_batch_size": 1, "run.save_every": 1}
    _nan_on(monkeypatch, every=4)  # rollout_batch_size 4: one NaN row per iteration
    first = train(load_config(None, setup.overrides(**common, **{"run.stop_after": 2})))
    records = read_metrics(out)
    assert [r["score/nonfinite"] for r in records] == [1.0, 1.0]
    for r in records:
        assert all(r[k] == r[k] for k in ("reward/running_mean", "reward/running_std", "score/raw/mean", "loss/total"))
    moments = torch.load(first.checkpoint / "trainer_state.pt", weights_only=False)["reward_moments"]
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in moments.values())
    monkeypatch.undo()  # the reward model is fixed: the resumed run goes on
    resumed = train(load_config(None, setup.overrides(**common, **{"run.resume": "latest"})))
    assert resumed.iterations_done == 3 and not resumed.interrupted
    assert read_metrics(out)[-1]["score/nonfinite"] == 0.0


def test_a_reward_model_scoring_all_nan_stops_naming_it(tiny_setups, tmp_path, monkeypatch):
    setup = tiny_setups("llama")
    _nan_on(monkeypatch, every=1)
    with pytest.raises(ModelError, match=f"reward model at {setup.reward}.*every response"):
        train(load_config(None, setup.overrides(**{"run.output_dir": tmp_path / "run"})))
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------
# 2. Models of the wrong type
# ----------------------------------------------------------------------------

def test_causal_lm_as_reward_model_is_refused(tiny_setups, tmp_path, capsys):
    setup = tiny_setups("llama")
    err = cli_error(capsys, ["train", *setup.overrides(**{"model.reward_path": setup.policy,
                                                           "run.output_dir": tmp_path / "r"})])
    assert "model.reward_path" in err and str(setup.policy) in err and "score.weight" in err
    assert "sequence-classification" in err


def test_an_adapter_export_as_reward_model_says_what_it_is(tiny_setups, tmp_path, capsys):
    """A `train-rm` export with run.export_adapter=true holds a LoRA adapter, not a model: said so, with how to get a
    merged model (not "not a saved Hugging Face model")."""
    setup = tiny_setups("llama")
    adapter = tmp_path / "rm_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(setup.policy),
                                                             "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    err = cli_error(capsys, ["train", *setup.overrides(**{"model.reward_path": adapter,
                                                           "run.output_dir": tmp_path / "r"})])
    assert f"model.reward_path: {adapter} holds a LoRA adapter" in err, err
    assert "run.export_adapter=false" in err and str(setup.policy) in err and "merge_and_unload" in err
    assert "not a saved Hugging Face model" not in err


def test_a_truncated_weights_file_is_one_line_naming_the_field(tiny_setups, tmp_path, capsys):
    """An interrupted copy or download leaves model.safetensors cut short: one line, not a safetensors traceback."""
    setup = tiny_setups("llama")
    policy = tmp_path / "policy"
    shutil.copytree(setup.policy, policy)
    weights = policy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    err = cli_error(capsys, ["train", *setup.overrides(**{"model.policy_path": policy, "run.output_dir": tmp_path / "r"})])
    assert f"model.policy_path: cannot read the weights of {policy}, probably truncated" in err, err


def test_a_truncated_tokenizer_file_is_one_line_naming_the_folder(tiny_setups, tmp_path, capsys):
    setup = tiny_setups("llama")
    policy = tmp_path / "policy"
    shutil.copytree(setup.policy, policy)
    tokenizer = policy / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:len(tokenizer.read_text()) // 2])
    err = cli_error(capsys, ["train", *setup.overrides(**{"model.policy_path": policy, "run.output_dir": tmp_path / "r"})])
    assert f"the tokenizer at {policy} has a file that is not valid JSON, probably truncated" in err, err


def test_a_refused_head_is_the_only_thing_printed(tiny_setups, tmp_path, capsys):
    """No transformers load report (a table of MISSING / UNEXPECTED keys, on the console) before the refusal."""
    import logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records = Records()
    hf = logging.getLogger("transformers")     # where transformers' console handler sits (it does not propagate)
    hf.addHandler(records)
    try:
        setup = tiny_setups("llama")
        cli_error(capsys, ["train", *setup.overrides(**{"model.reward_path": setup.policy, "run.output_dir": tmp_path / "r"})])
    finally:
        hf.removeHandler(records)
    assert not [m for m in records.messages if "LOAD REPORT" in m], records.messages


def test_classifier_as_policy_is_refused(tiny_setups, tmp_path, capsys):
    setup = tiny_setups("llama")
    err = cli_error(capsys, ["train", *setup.overrides(**{"model.policy_path": setup.reward,
                                                           "run.output_dir": tmp_path / "r"})])
    assert "model.policy_path" in err and "lm_head.weight" in err and "causal LM" in err


def test_sft_from_a_classifier_is_refused(tiny_setups, tmp_path, capsys):
    setup = tiny_setups("llama")
    err = cli_error(capsys, ["sft", f"model.path={setup.reward}", f"data.train_path={setup.sft}",
                             f"run.output_dir={tmp_path / 's'}", "run.device=cpu", "run.progress_bar=false"])
    assert "model.path" in err and "lm_head.weight" in err and "causal LM" in err


def test_train_rm_lm_loss_from_a_classifier_is_refused(tiny_setups, tmp_path, capsys):
    setup = tiny_setups("llama")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "tell me about the cat :", "chosen": "the cat is kind .",
                                 "rejected": "the cat is sad ."}) + "\n")
    err = cli_error(capsys, ["train-rm", f"model.path={setup.reward}", f"data.train_path={pairs}", "loss.lm_coef=0.5",
                             f"run.output_dir={tmp_path / 'rm'}", "run.device=cpu", "run.progress_bar=false"])
    assert "model.path" in err and "lm_head.weight" in err and "loss.lm_coef" in err


def test_reward_model_with_two_labels_is_refused(tiny_setups, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    setup = tiny_setups("llama")
    tok = AutoTokenizer.from_pretrained(setup.policy)
    cfg = model_configs("llama", len(tok), bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    cfg.num_labels = 2
    two = tmp_path / "two_labels"
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(two)
    tok.save_pretrained(two)
    err = cli_error(capsys, ["train", *setup.overrides(**{"model.reward_path": two, "run.output_dir": tmp_path / "r"})])
    assert "model.reward_path" in err and "2 labels" in err and "num_labels=1" in err


# ----------------------------------------------------------------------------
# 3. Tokenizers that do not load as saved
# ----------------------------------------------------------------------------

def _word_level_next_to_qwen2(root):
    """The demo's word-level tokenizer saved next to a Qwen2 config: transformers 5 reads it back as Qwen2's
    byte-level BPE."""
    from transformers import AutoModelForCausalLM

    tok = S.build_tokenizer(root)
    AutoModelForCausalLM.from_config(model_configs("qwen2", len(tok), eos_id=tok.eos_token_id,
                                                   pad_id=tok.pad_token_id)).save_pretrained(root)
    return tok


def test_a_tokenizer_that_garbles_the_prompts_is_refused(tmp_path):
    from transformers import AutoTokenizer

    _word_level_next_to_qwen2(tmp_path / "m")
    prompts = S.write_jsonl(tmp_path / "p.jsonl", S.make_prompts(20, seed=0))
    garbling = AutoTokenizer.from_pretrained(tmp_path / "m")
    text = "describe the red fox :"
    if garbling.decode(garbling(text, add_special_tokens=False)["input_ids"]).split() == text.split():
        pytest.skip("this transformers version loads the saved word-level tokenizer as saved")
    with pytest.raises(ModelError, match=f"tokenizer at {tmp_path / 'm'}.*change under encode -> decode"):
        check_tokenizer(garbling, prompts, {"prompt": "data.prompt_field"})
    # fastppo loads the tokenizer class that was saved, and that one passes the check
    tok = load_tokenizer(str(tmp_path / "m"))
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(load_prompts(prompts, tok, field="prompt", prompt_format="auto", max_len=16)) == 20


def test_a_tokenizer_that_does_not_cover_the_data_is_refused(tmp_path):
    tok = S.build_tokenizer(tmp_path / "m")
    rows = [{"prompt": "quelle est la couleur du renard ?"}, {"prompt": "describe the red fox :"}]
    path = S.write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match="unknown token"):
        load_prompts(path, tok, field="prompt", prompt_format="auto", max_len=16)


def test_unknown_tokens_name_the_field_and_examples_and_the_limit_is_a_setting(tiny_setups, tmp_path, capsys):
    """A data.prompt_field pointing at a field that is not the text (here an id) is reported as that, with the field,
    its config key, an example and the limit to change; data.max_unknown_token_frac moves the limit (1: off)."""
    setup = tiny_setups("llama")
    rows = [{"prompt": "describe the red fox :", "id": f"Q{i:04d}x"} for i in range(8)]
    data = S.write_jsonl(tmp_path / "p.jsonl", rows)
    ov = setup.overrides(**{"data.prompt_path": data, "data.prompt_field": "id", "run.output_dir": tmp_path / "a"})
    err = cli_error(capsys, ["train", *ov])
    assert "field 'id' (data.prompt_field)" in err and "'Q0000x' -> " in err and "(line 1)" in err, err
    assert "data.max_unknown_token_frac=0.05" in err and "tokenizer at" in err, err
    assert "does not cover" not in err                       # no longer blamed on the tokenizer alone
    mostly = [{"prompt": "describe the red fox : " + ("zzz" if i < 3 else "")} for i in range(8)]
    data = S.write_jsonl(tmp_path / "q.jsonl", mostly)       # 3 unknown words in 43 tokens: 7%
    with pytest.raises(DataError, match=r"3 of the 43 tokens \(7%\)"):
        train(load_config(None, setup.overrides(**{"data.prompt_path": data, "run.output_dir": tmp_path / "b"})))
    result = train(load_config(None, setup.overrides(**{"data.prompt_path": data, "run.output_dir": tmp_path / "c",
                                                        "run.iterations": 1, "data.max_unknown_token_frac": 0.1})))
    assert result.iterations_done == 1


# ----------------------------------------------------------------------------
# 4. One-line errors for bad model paths and bad data
# ----------------------------------------------------------------------------

def test_model_path_that_does_not_exist(tiny_setups, tmp_path, capsys):
    setup = tiny_setups("llama")
    missing = tmp_path / "no" / "such" / "model"
    err = cli_error(capsys, ["train", *setup.overrides(**{"model.policy_path": missing, "run.output_dir": tmp_path / "r"})])
    assert "model.policy_path" in err and f"no such folder: {missing}" in err


def test_model_folder_without_config(tiny_setups, tmp_path, capsys):
    setup = tiny_setups("llama")
    folder = tmp_path / "only_tokenizer"
    load_tokenizer(str(setup.policy)).save_pretrained(folder)
    err = cli_error(capsys, ["sft", f"model.path={folder}", f"data.train_path={setup.sft}",
                             f"run.output_dir={tmp_path / 's'}", "run.device=cpu"])
    assert "model.path" in err and "no config.json" in err


def test_hub_id_while_offline(tiny_setups, tmp_path):
    setup = tiny_setups("llama")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    code = "import sys; from fastppo.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = setup.overrides(**{"model.reward_path": "fastppo-test/no-such-model", "run.output_dir": tmp_path / "r"})
    proc = subprocess.run([sys.executable, "-c", code, "train", *argv], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    err = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "model.reward_path" in err[0] and "fastppo-test/no-such-model" in err[0] and "HF_HUB_OFFLINE" in err[0]


def test_non_utf8_data_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "the red fox :"}\n{"prompt": "the \xe9t\xe9 fox :"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 17\)"):
        load_prompts(path, S.build_tokenizer(), field="prompt", prompt_format="auto", max_len=16)


def test_a_utf8_file_with_a_byte_order_mark_reads(tmp_path):
    from fastppo.data import read_records

    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "the red fox :"}\n{"prompt": "a dog"}\n')
    assert [rec["prompt"] for _, rec in read_records(path)] == ["the red fox :", "a dog"]


def test_empty_data_file(tiny_setups, tmp_path, capsys):
    setup = tiny_setups("llama")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = cli_error(capsys, ["train", *setup.overrides(**{"data.prompt_path": empty, "run.output_dir": tmp_path / "r"})])
    assert str(empty) in err and "no prompts" in err


# ----------------------------------------------------------------------------
# 5. Chat prompt files
# ----------------------------------------------------------------------------

def test_train_reads_a_messages_field_like_sft(tmp_path):
    tok = S.build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} . {% endfor %}" \
                        "{% if add_generation_prompt %}assistant :{% endif %}"
    user = {"role": "user", "content": "describe the red fox"}
    chat = S.write_jsonl(tmp_path / "chat.jsonl", [{"messages": [user, {"role": "assistant", "content": "it runs"}]},
                                                    {"messages": [user]}])
    kw = dict(prompt_format="auto", max_len=32)
    got = load_prompts(chat, tok, field="prompt", **kw)
    want = tok(tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert got == [want, want]  # an assistant turn at the end is the reference response, not part of the prompt


# ----------------------------------------------------------------------------
# 6. flash_attention_2
# ----------------------------------------------------------------------------

def test_flash_attention_with_float32_compute_is_refused(tiny_setups, monkeypatch):
    import fastppo.models

    monkeypatch.setattr(fastppo.models, "is_flash_attn_2_available", lambda: True)   # installed, with a GPU
    setup = tiny_setups("llama")
    cfg = load_config(None, setup.overrides(**{"model.attn_implementation": "flash_attention_2"}))
    with pytest.raises(ModelError, match="model.dtype and parallel.param_dtype give float32"):
        load_models(cfg.model, torch.device("cpu"))
    with pytest.raises(ModelError, match="flash_attention_2 needs bfloat16 or float16 compute, but model.dtype"):
        model_kwargs(StageModelConfig(path=str(setup.policy), attn_implementation="flash_attention_2"))


def test_flash_attention_falls_back_to_sdpa_without_flash_attn(tiny_setups, monkeypatch, caplog):
    import fastppo.models

    monkeypatch.setattr(fastppo.models, "is_flash_attn_2_available", lambda: False)
    setup = tiny_setups("llama")
    cfg = load_config(None, setup.overrides(**{"model.attn_implementation": "flash_attention_2",
                                               "model.dtype": "bfloat16"}))
    with caplog.at_level("WARNING", logger="fastppo"):
        models = load_models(cfg.model, torch.device("cpu"))
    assert "using sdpa" in caplog.text
    assert {m.config._attn_implementation for m in (models.policy, models.critic, models.reward)} == {"sdpa"}
    assert attn_implementation("flash_attention_2", compute_dtype=torch.bfloat16, fields="model.dtype") == "sdpa"
    # A GPU config (float32 master weights, parallel.param_dtype=auto: float32 compute on CPU) runs here too.
    assert attn_implementation("flash_attention_2", compute_dtype=torch.float32, fields="model.dtype") == "sdpa"


# ----------------------------------------------------------------------------
# 7. Vocabularies padded to a multiple of 64
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
def test_padded_vocabulary_leaves_real_token_logprobs_unchanged(tiny_setups, fused):
    from transformers import AutoTokenizer

    setup = tiny_setups("gpt2")  # no pad token: one is added, V = len(tokenizer) becomes odd
    models = load_models(load_config(None, setup.overrides()).model, torch.device("cpu"))
    V = models.vocab_size
    rows = models.policy.get_output_embeddings().weight.size(0)
    assert V == len(models.tokenizer) == len(AutoTokenizer.from_pretrained(setup.policy)) + 1
    assert rows % EMBEDDING_ROWS_MULTIPLE == 0 and rows > V
    assert models.critic.get_input_embeddings().num_embeddings % EMBEDDING_ROWS_MULTIPLE == 0

    exact = copy.deepcopy(models.policy)
    exact.resize_token_embeddings(V)  # the same model with exactly V rows: the first V rows are copied
    exact.get_output_embeddings()._forward_hooks.clear()
    assert exact.get_output_embeddings().weight.size(0) == V

    B, P, R = 3, 4, 5
    ids = torch.randint(0, V, (B, P + R))
    mask = torch.ones_like(ids)
    rmask = torch.rand(B, R) < 0.8
    kw = dict(prompt_width=P, temperature=0.7, return_entropy=True, backend="torch")
    padded = response_logprobs(models.policy, ids, mask, rmask, fused=fused, vocab_size=V, **kw)
    implicit = response_logprobs(models.policy, ids, mask, rmask, fused=fused, **kw)  # size recorded by load_models
    ref = response_logprobs(exact, ids, mask, rmask, fused=False, **kw)

    # Error analysis: each logit is a length-H dot product h.w; computed with a different number of output
    # columns it may be summed in another order, which moves it by at most gamma_H * sum|h_i w_i| in each
    # computation (gamma_H ~ H u; Higham, "Accuracy and Stability of Numerical Algorithms", 3.1), so the two
    # z = logits / T differ by delta <= 2 gamma_H max sum|h_i w_i| / T. log-softmax is 2-Lipschitz in the
    # max-norm of z; the entropy's gradient -p (z - E_p z) has 1-norm <= max z - min z. Add a few ulp of the
    # results for the final roundings.
    every = Packing.padded_batch(mask, torch.ones_like(mask, dtype=torch.bool))        # the padded batch, all states
    h = backbone_states(exact, ids, mask, every).view(*ids.shape, -1)[:, P - 1:-1]     # (B, R, H)
    z = (h @ exact.get_output_embeddings().weight.T) / kw["temperature"]                # (B, R, V)
    u = torch.finfo(torch.float32).eps / 2
    delta = 2 * h.size(-1) * u * (h.abs() @ exact.get_output_embeddings().weight.abs().T).max().item() / kw["temperature"]
    spread = (z.amax(-1) - z.amin(-1)).max().item()
    for out in (padded, implicit):
        torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=0,
                                   atol=2 * delta + 8 * u * ref.logprobs.abs().max().item())
        torch.testing.assert_close(out.entropy, ref.entropy, rtol=0, atol=spread * delta + 8 * u * math.log(V))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])   # tied and untied lm_head
def test_export_leaves_out_the_alignment_rows(tiny_setups, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    setup = tiny_setups(arch)
    models = load_models(load_config(None, setup.overrides()).model, torch.device("cpu"))
    V, policy = models.vocab_size, models.policy
    before = AutoModelForCausalLM.from_pretrained(setup.policy).get_input_embeddings().num_embeddings
    assert before % EMBEDDING_ROWS_MULTIPLE and not policy.get_input_embeddings().num_embeddings % EMBEDDING_ROWS_MULTIPLE
    out = export_hf(policy, models.tokenizer, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out)
    with safe_open(out / "model.safetensors", "pt") as new, safe_open(Path(setup.policy) / "model.safetensors", "pt") as old:
        assert set(new.keys()) == set(old.keys())                # a tied lm_head is not written twice
    # The checkpoint's rows plus the added pad token: nothing outside fastppo masks the zero alignment rows'
    # logits, so HF generate on an export that kept them could sample ids the tokenizer does not have.
    rows = max(before, V)
    assert exported.get_input_embeddings().num_embeddings == exported.config.vocab_size == rows
    assert exported.get_output_embeddings().weight.size(0) == rows
    live = policy.state_dict()
    for name, tensor in exported.state_dict().items():                        # every weight, the tables' first rows
        torch.testing.assert_close(tensor, live[name][:tensor.size(0)], rtol=0, atol=0)
    assert policy.get_input_embeddings().num_embeddings > rows and policy.config.vocab_size > rows  # live: unchanged


def test_export_leaves_out_the_alignment_rows_of_an_lm_head_bias(tmp_path):
    from transformers import AutoModelForCausalLM, GPTJConfig, GPTJForCausalLM

    model = GPTJForCausalLM(GPTJConfig(vocab_size=100, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=16))
    grow_embeddings(model, 101, "policy", EMBEDDING_ROWS_MULTIPLE)            # a pad token, then alignment rows
    assert model.lm_head.bias.numel() == 128
    out = export_hf(model, SimpleNamespace(save_pretrained=lambda path: None), tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.lm_head.weight.size(0) == back.lm_head.bias.numel() == back.config.vocab_size == 101
    torch.testing.assert_close(back.lm_head.bias, model.lm_head.bias[:101], rtol=0, atol=0)


def test_padding_ids_are_never_sampled(tiny_setups):
    setup = tiny_setups("gpt2")
    models = load_models(load_config(None, setup.overrides()).model, torch.device("cpu"))
    ids = torch.randint(0, models.vocab_size, (2, 5))
    with torch.no_grad():
        logits = models.policy(input_ids=ids).logits
    V = models.vocab_size
    probs = logits.float().softmax(-1)
    assert torch.isfinite(logits).all() and probs[..., V:].max().item() == 0.0  # exp underflows to exactly 0
    assert torch.allclose(probs[..., :V].sum(-1), torch.ones(2, 5))


# ----------------------------------------------------------------------------
# 8. Model folders that are broken: one line naming the field, the folder and the fix
# ----------------------------------------------------------------------------

def _break(policy: Path, how: str) -> None:
    config = json.loads((policy / "config.json").read_text())
    if how == "unknown model_type":
        config["model_type"] = "llamax"
    elif how == "no model_type":
        del config["model_type"]
    elif how == "other shapes":
        config["hidden_size"], config["intermediate_size"] = 2 * config["hidden_size"], 2 * config["intermediate_size"]
    (policy / "config.json").write_text(json.dumps(config))
    if how == "truncated config.json":
        (policy / "config.json").write_text(json.dumps(config)[:40])
    elif how == "no weights":
        (policy / "model.safetensors").unlink()
    elif how == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (policy / name).unlink()


@pytest.mark.parametrize("how, said", [
    ("unknown model_type", "{p}/config.json: model_type 'llamax' is not known to transformers .* \\(a typo, or a model "
                           "that needs a newer transformers or model.trust_remote_code=true\\)"),
    ("no model_type", "{p}/config.json has no model_type, so transformers cannot tell the architecture: add it"),
    ("truncated config.json", "{p}/config.json is not valid JSON \\(.*line 1 column 41.*\\), probably truncated"),
    ("no weights", "{p} has a config.json but no weights \\(model.safetensors, .*\\): copy them there, or save the "
                   "model with save_pretrained"),
    ("no tokenizer", "{p} holds no tokenizer \\(no tokenizer.json or tokenizer_config.json\\): save the model's "
                     "tokenizer next to it"),
    ("other shapes", "the weights in {p} do not match its config.json \\(e.g. .*: \\(.*, 32\\) in the weights, "
                     "\\(.*, 64\\) by the config; .* weights differ\\): the config was edited"),
])
def test_a_broken_model_folder_is_one_line_naming_the_field(how, said, tiny_setups, tmp_path, capsys):
    """Not transformers' traceback (or its advice to install sentencepiece, or to set ignore_mismatched_sizes)."""
    setup = tiny_setups("llama")
    policy = tmp_path / "policy"
    shutil.copytree(setup.policy, policy)
    _break(policy, how)
    err = cli_error(capsys, ["train", *setup.overrides(**{"model.policy_path": policy, "run.output_dir": tmp_path / "r"})])
    assert re.search("model.policy_path: " + said.format(p=re.escape(str(policy))), err), err


def test_a_hub_id_that_cannot_be_reached_suggests_the_offline_mode(monkeypatch):
    import fastppo.models as models

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(models, "cached_file", unreachable)
    monkeypatch.setattr(models.hf_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelError, match="model.reward_path: org/rm is not a local folder.*couldn't connect.*without a "
                                         "network, HF_HUB_OFFLINE=1 reads the local cache at once"):
        models.check_model_source("org/rm", "model.reward_path")


def test_rollouts_longer_than_the_models_positions_are_refused_at_start_up(tiny_setups, tmp_path, capsys):
    """A learned position table would be indexed out of range in the middle of the first rollout (IndexError; on
    CUDA a device-side assert): refused before it, naming the fields that make the length."""
    from fastppo.models import check_positions

    setup = tiny_setups("llama")                                         # max_position_embeddings 256
    out = tmp_path / "r"
    err = cli_error(capsys, ["train", *setup.overrides(**{"rollout.max_new_tokens": 250, "run.output_dir": out})])
    assert re.search(rf"model.policy_path: {re.escape(str(setup.policy))} takes at most 256 positions "
                     r"\(max_position_embeddings in its config.json\), but the longest prompt \((\d+) tokens; "
                     r"data.max_prompt_len=16\) \+ rollout.max_new_tokens \(250\) = 2\d\d: lower one of them", err), err
    assert not (out / "metrics.jsonl").exists()
    limit = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=20))
    models = SimpleNamespace(policy=limit, critic=None, reward=limit)
    check_positions(models, Config().model, 19, "x")
    with pytest.raises(ModelError, match=r"model.reward_path: None takes at most 20 positions .* but x \+ 1 \(the EOS "
                                         r"appended to score a cut response\) = 21"):
        check_positions(models, Config().model, 20, "x")


# ----------------------------------------------------------------------------
# 9. Data: folders, JSON arrays, chat roles, truncation, identical pairs
# ----------------------------------------------------------------------------

FOX = {"prompt": "describe the red fox :"}


def test_a_prompt_folder_reads_every_data_file_says_which_and_refuses_held_out_splits(tmp_path, logged):
    tok = S.build_tokenizer()
    folder = tmp_path / "prompts"
    S.write_jsonl(folder / "a.jsonl", [FOX] * 2)
    S.write_jsonl(folder / "b.json", [FOX] * 3)                          # read like a .json file given alone
    (folder / "notes.txt").write_text("not data\n")
    assert len(load_prompts(folder, tok, field="prompt", prompt_format="auto", max_len=16)) == 5
    assert f"INFO 5 prompts from {folder}: a.jsonl, b.json" in logged
    assert f"WARNING {folder}: skipped notes.txt (records are read from .jsonl/.json/.parquet files)" in logged
    S.write_jsonl(folder / "test.jsonl", [FOX])
    with pytest.raises(DataError, match=rf"{folder}: holds files named like held-out splits \(test.jsonl\), which would "
                                        r"be read together with the others: give the file to train on"):
        load_prompts(folder, tok, field="prompt", prompt_format="auto", max_len=16)
    only_json = tmp_path / "only_json"
    S.write_jsonl(only_json / "x.json", [FOX])
    assert len(load_prompts(only_json, tok, field="prompt", prompt_format="auto", max_len=16)) == 1


@pytest.mark.parametrize("text", ['[\n  {"prompt": "describe the red fox :"}\n]\n', '[{"prompt": "describe the red fox :"}]\n'])
def test_a_json_array_is_refused_saying_how_records_are_read(text, tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"prompts.json:1: each line must be a JSON object, and this file holds a JSON "
                                        r"array: .json and .jsonl files are read as JSON Lines, one object per line; "
                                        rf"convert it, e.g. jq -c '.\[\]' {path} > {tmp_path}/prompts_lines.jsonl"):
        load_prompts(path, S.build_tokenizer(), field="prompt", prompt_format="auto", max_len=16)


@pytest.mark.parametrize("messages, said", [
    ([{"role": "user", "content": "describe the red fox"}, {"role": "Assistant", "content": "it runs"}],
     "message 1: role 'Assistant' is not one of system, user, assistant, tool \\(roles are lower case\\)"),
    ([{"role": "bot", "content": "describe the red fox"}], "message 0: role 'bot' is not one of system, user"),
    ([{"role": "assistant", "content": "the red fox"}], "has no user message \\(roles: assistant\\): a prompt needs one"),
])
def test_chat_roles_are_checked(messages, said, tmp_path):
    """'Assistant' would not be taken for the reference response and would leak it into the prompt, 'bot' would
    be rendered by the template as something else."""
    tok = S.build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} . {% endfor %}assistant :"
    path = S.write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages}])
    with pytest.raises(DataError, match=rf"chat.jsonl:1: field 'prompt' {said}"):
        load_prompts(path, tok, field="prompt", prompt_format="auto", max_len=16)


def test_truncated_prompts_are_counted_and_all_cut_to_a_fragment_refused(tmp_path, logged):
    tok = S.build_tokenizer()
    path = S.write_jsonl(tmp_path / "p.jsonl", [FOX, {"prompt": "the fox :"}])
    n, short = (len(tok(r["prompt"])["input_ids"]) for r in (FOX, {"prompt": "the fox :"}))
    assert n > short + 1
    load_prompts(path, tok, field="prompt", prompt_format="auto", max_len=n - 1)
    assert (f"WARNING 1 of 2 prompts of {path} are longer than data.max_prompt_len={n - 1} tokens and keep only their "
            f"last {n - 1} (longest: {n})") in logged
    cut = (short - 1) // 2                                          # every prompt keeps less than half itself
    with pytest.raises(DataError, match=rf"every prompt is longer than data.max_prompt_len={cut} tokens and would keep "
                                        rf"less than half of itself, the end \({short} to {n} tokens\): raise "
                                        r"data.max_prompt_len"):
        load_prompts(path, tok, field="prompt", prompt_format="auto", max_len=cut)


def test_preference_pairs_without_a_preference_are_refused_or_counted(tmp_path, logged):
    from fastppo.reward_training import load_pairs

    tok = S.build_tokenizer()
    same = {"prompt": "describe the red fox :", "chosen": "the red fox is kind .", "rejected": "the red fox is kind ."}
    kw = dict(prompt_field="prompt", chosen_field="chosen", rejected_field="rejected", max_len=32)
    with pytest.raises(DataError, match="in every pair 'chosen' and 'rejected' are the same tokens"):
        load_pairs(S.write_jsonl(tmp_path / "same.jsonl", [same] * 2), tok, **kw)
    path = S.write_jsonl(tmp_path / "some.jsonl", [same, {**same, "rejected": "the red fox is quick ."}])
    assert len(load_pairs(path, tok, **kw)) == 2
    assert [m for m in logged if "1 of 2 pairs have the same tokens in 'chosen' and 'rejected'" in m]
