"""Reward functions (`fastppo.rewards`): weights, None, exceptions, timeouts, the prompt's record, math_answer,
and a run scored by reward functions alone (no reward model loaded)."""

from __future__ import annotations

import importlib
import time
from types import SimpleNamespace

import pytest
import torch
from fastppo.config import ConfigError, RewardConfig, RewardFunctionConfig, load_config
from fastppo.data import load_prompts
from fastppo.rewards import RewardFunctionError, RewardFunctions, UnusableRewardFunction, call_function, math_answer
from fastppo.train import train
from fastppo_testing.tiny_models import build_tokenizer, write_jsonl
from fastppo_testing.trainer import logged, outcomes_for, read_metrics, tiny_setups  # noqa: F401  (fixtures)

MODULE = "fastppo_testing.reward_fns"


def _fns(*specs, **kw) -> RewardFunctions:
    fns = [RewardFunctionConfig(name=f"{MODULE}:{name}", weight=weight) for name, weight in specs]
    return RewardFunctions(RewardConfig(functions=fns, function_workers=2, **kw))


@pytest.fixture
def scorer():
    """Builds RewardFunctions and stops their worker pools after the test."""
    made = []

    def make(*specs, **kw):
        made.append(_fns(*specs, **kw))
        return made[-1]

    yield make
    for fns in made:
        fns.close()


def test_functions_are_summed_with_their_weights_and_see_the_record(scorer):
    fns = scorer(("length", 0.5), ("field_x", -2.0))
    out = fns.score(["p", "p"], ["abc", "abcdef"], [{"x": 1}, {"x": 4}], [10, 11])
    # Small integers and halves: exact in binary floating point, whatever the order of the sum.
    assert out.totals == [0.5 * 3 - 2 * 1, 0.5 * 6 - 2 * 4]
    assert out.means == {f"{MODULE}:length": 4.5, f"{MODULE}:field_x": 2.5}
    assert (out.invalid, out.timeouts, out.errors) == (0, 0, 0)


def test_none_scores_the_invalid_score(scorer):
    out = scorer(("none_when_odd", 2.0), invalid_score=-1.5).score(["p", "p"], ["a", "b"], [{"x": 1}, {"x": 2}], [0, 1])
    assert out.totals == [2.0 * -1.5, 2.0 * 1.0] and out.invalid == 1


def test_an_exception_stops_the_run_naming_the_prompt_and_the_function(scorer):
    fns = scorer(("raises_on_3", 1.0))
    with pytest.raises(RewardFunctionError, match=rf"{MODULE}:raises_on_3 \(reward\.functions\[0\]\) raised on "
                                                  r"prompt 7: ValueError: bad record 3"):
        fns.score(["p", "p"], ["a", "b"], [{"x": 1}, {"x": 3}], [6, 7])


def test_an_exception_scores_invalid_when_configured(scorer):
    fns = scorer(("raises_on_3", 1.0), function_errors="invalid", invalid_score=-1.0)
    out = fns.score(["p", "p"], ["a", "b"], [{"x": 1}, {"x": 3}], [6, 7])
    assert out.totals == [0.5, -1.0] and out.errors == 1


def test_a_reward_beyond_float32_follows_function_errors(scorer):
    """1e300 is finite in Python but infinite in float32, where scores are computed: an error (naming the range),
    not a score that silently stops the learning."""
    with pytest.raises(RewardFunctionError, match=rf"{MODULE}:huge .* prompt 4: ValueError: returned 1e\+300; a reward "
                                                  r"must be finite in float32"):
        scorer(("huge", 1.0)).score(["p"], ["a"], [{}], [4])
    out = scorer(("huge", 1.0), function_errors="invalid", invalid_score=-1.0).score(["p"], ["a"], [{}], [4])
    assert out.totals == [-1.0] and out.errors == 1


def test_a_weighted_sum_beyond_float32_drops_the_row():
    """Each value fits float32, their weighted sum does not: the row is non-finite (dropped, counted), not inf."""
    from fastppo.rollout import Rollout

    rollout = Rollout(sequences=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3).long(),
                      response_mask=torch.ones(2, 2, dtype=torch.bool), lengths=torch.tensor([2, 2]),
                      ended=torch.tensor([True, True]), prompt_width=1)
    models = SimpleNamespace(reward=None, tokenizer=SimpleNamespace(eos_token_id=2, pad_token_id=0))
    cfg = load_config(None, ["model.policy_path=p", "model.reward_path=r", "data.prompt_path=d"])
    scores, nonfinite = outcomes_for(models, rollout, cfg, batch_size=2,
                                       function_scores=torch.tensor([3e38, 1.0], dtype=torch.float64) * 2)
    assert nonfinite.tolist() == [True, False] and scores.tolist() == [0.0, 2.0]


@pytest.mark.parametrize("name, said", [
    ("exits", r"raised on prompt 5: RuntimeError: it called sys\.exit\(3\)"),
    ("dies", r"on prompt 5: its worker process exited with code 7 while running it"),
    ("segfaults", r"on prompt 5: its worker process was killed by SIGSEGV"),
])
def test_a_function_that_ends_its_process_is_named_with_how(scorer, name, said):
    """sys.exit is an error like any other (function_errors decides); a worker that dies is reported with its exit
    code or signal, naming the function and the prompt, not as a missing __main__ guard."""
    with pytest.raises(RewardFunctionError, match=rf"{MODULE}:{name} \(reward\.functions\[0\]\) {said}") as err:
        scorer((name, 1.0)).score(["p"], ["a"], [{}], [5])
    assert "__main__" not in str(err.value)


def test_a_module_in_the_working_folder_is_imported(tmp_path, monkeypatch, scorer):
    """`fastppo` started next to myrewards.py finds myrewards:good (as `python script.py` would), in the trainer
    and in the worker processes; a module that is nowhere says where it was looked for."""
    (tmp_path / "myrewards_probe.py").write_text("def good(prompt, response, record):\n    return 2.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    fns = RewardFunctions(RewardConfig(functions=[RewardFunctionConfig(name="myrewards_probe:good")], function_workers=1))
    try:
        assert fns.score(["p"], ["a"], [{}], [0]).totals == [2.5]
    finally:
        fns.close()
    with pytest.raises(RewardFunctionError, match=rf"no module named 'nowhere_probe' .* nor in the working folder "
                                                  rf"{tmp_path}: put nowhere_probe\.py there"):
        RewardFunctions(RewardConfig(functions=[RewardFunctionConfig(name="nowhere_probe:good")]))


def test_the_same_function_twice_is_refused():
    base = ["model.policy_path=p", "data.prompt_path=d"]
    fns = f"reward.functions=[{{name: '{MODULE}:length'}}, {{name: '{MODULE}:field_x'}}, {{name: '{MODULE}:length'}}]"
    with pytest.raises(ConfigError, match=r"field 'reward\.functions\[2\]\.name': repeats reward\.functions\[0\]"):
        load_config(None, [*base, fns], preset="grpo")


def test_a_hanging_function_times_out_and_its_worker_is_replaced(scorer):
    fns = scorer(("sleeps_on_2", 1.0), function_timeout_s=1.0, invalid_score=-4.0)
    t0 = time.monotonic()
    out = fns.score(["p"] * 3, ["a"] * 3, [{"x": 1}, {"x": 2}, {"x": 5}], [0, 1, 2])
    assert time.monotonic() - t0 < 120          # the call sleeps 600 s: it was killed, not awaited
    assert out.totals == [2.0, -4.0, 2.0] and out.timeouts == 1
    assert fns.score(["p"], ["a"], [{"x": 1}], [0]).totals == [2.0]      # the pool works on after the kill


def test_a_result_that_is_not_a_number_names_the_function(scorer):
    with pytest.raises(RewardFunctionError, match=rf"{MODULE}:returns_text .* TypeError: returned str"):
        scorer(("returns_text", 1.0)).score(["p"], ["a"], [{}], [0])


def test_functions_that_cannot_be_loaded_fail_at_start_up_naming_the_field():
    with pytest.raises(RewardFunctionError, match=r"reward\.functions\[0\]\.name: no module named 'no_such_mod'"):
        RewardFunctions(RewardConfig(functions=[RewardFunctionConfig(name="no_such_mod:f")]))
    with pytest.raises(RewardFunctionError, match=r"reward\.functions\[1\]\.name: 'fastppo\.rewards' has no callable"):
        RewardFunctions(RewardConfig(functions=[RewardFunctionConfig(name="fastppo.rewards:math_answer"),
                                                RewardFunctionConfig(name="fastppo.rewards:nope")]))
    base = ["model.policy_path=p", "data.prompt_path=d"]
    with pytest.raises(ConfigError, match=r"field 'reward\.functions\[0\]\.name': must look like module:function"):
        load_config(None, [*base, "reward.functions=[{name: just_a_name}]"], preset="grpo")
    with pytest.raises(ConfigError, match=r"field 'model\.reward_path': is null and reward\.functions is empty"):
        load_config(None, base, preset="grpo")
    with pytest.raises(ConfigError, match=r"field 'reward\.function_timeout_s': must be > 0"):
        load_config(None, [*base, "model.reward_path=r", "reward.function_timeout_s=0"], preset="grpo")


def test_math_answer_compares_final_answers_with_math_verify():
    assert math_answer("what is 6 * 7 ?", "6 * 7 = 42", {"answer": "42"}) == 1.0
    assert math_answer("half of 1 ?", r"the answer is $\frac{1}{2}$", {"answer": "0.5"}) == 1.0
    assert math_answer("what is 6 * 7 ?", "it is 41", {"answer": 42}) == 0.0
    assert math_answer("what is 6 * 7 ?", "no idea", {"answer": "42"}) == 0.0
    with pytest.raises(KeyError, match="needs an 'answer' field"):
        math_answer("q", "42", {"question": "q"})


def test_load_prompts_hands_each_prompt_its_record(tmp_path):
    rows = [{"prompt": "tell me about the red fox :", "answer": "7", "x": 1},
            {"prompt": [{"role": "user", "content": "tell me about the cat"}], "answer": "8"}]
    records = []
    prompts = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), build_tokenizer(), field="prompt",
                           prompt_format="auto", max_len=16, records=records)
    assert len(prompts) == 2 and records == rows


def test_reward_functions_alone_score_a_grpo_run(tiny_setups, tmp_path, monkeypatch):
    """model.reward_path null: no reward model is loaded, the raw score is the functions' weighted sum."""
    train_module = importlib.import_module("fastppo.train")     # (the package's `train` is the function)
    loaded = []
    real = train_module.load_models
    monkeypatch.setattr(train_module, "load_models", lambda *a, **kw: loaded.append(real(*a, **kw)) or loaded[-1])
    setup = tiny_setups("llama")
    cfg = load_config(None, setup.overrides(**{
        "model.reward_path": None, "run.output_dir": tmp_path / "run", "run.iterations": 2,
        "rollout.rollout_batch_size": 2, "rollout.n_samples_per_prompt": 2, "ppo.minibatch_size": 2,
        "reward.functions": f"[{{name: '{MODULE}:text_hash', weight: 0.5}}]"}), preset="grpo")
    result = train(cfg)
    assert loaded[0].reward is None and loaded[0].critic is None
    for r in read_metrics(tmp_path / "run"):
        # score = 0.5 * text_hash: sums of at most 4 halves of integers < 97, exact in float32
        assert r["score/raw/mean"] == 0.5 * r[f"reward_fn/{MODULE}:text_hash/mean"]
        assert r["reward_fn/errors"] == r["reward_fn/timeouts"] == 0
    assert result.iterations_done == 2


def test_reward_model_score_and_functions_add(monkeypatch):
    """The raw score is the reward model's (0 where it is NaN/inf: that row is dropped) plus the functions' sum."""
    import fastppo.groups as groups
    from fastppo.rollout import Rollout

    rollout = Rollout(sequences=torch.tensor([[5, 6, 2], [5, 7, 2], [5, 8, 8]]), attention_mask=torch.ones(3, 3).long(),
                      response_mask=torch.ones(3, 2, dtype=torch.bool), lengths=torch.tensor([2, 2, 2]),
                      ended=torch.tensor([True, True, False]), prompt_width=1)
    models = SimpleNamespace(reward=object(), tokenizer=SimpleNamespace(eos_token_id=2, pad_token_id=0))
    by_token = {6: 1.0, 7: float("nan"), 8: -2.0}       # each row's score from its own tokens: any row order works
    monkeypatch.setattr(groups, "score_at", lambda model, ids, mask, index, pack=None:
                        torch.tensor([by_token[int(i)] for i in ids[:, 1]]))
    cfg = load_config(None, ["model.policy_path=p", "model.reward_path=r", "data.prompt_path=d"])
    scores, nonfinite = outcomes_for(models, rollout, cfg, batch_size=4,
                                       function_scores=torch.tensor([0.5, 0.25, 1.0]))
    assert scores.tolist() == [1.5, 0.25, -1.0] and nonfinite.tolist() == [False, True, False]
    models.reward = None                                          # functions alone
    scores, nonfinite = outcomes_for(models, rollout, cfg, batch_size=4, function_scores=torch.tensor([0.5, 0.25, 1.0]))
    assert scores.tolist() == [0.5, 0.25, 1.0] and not nonfinite.any()


def test_arithmetic_demo_runs_sft_then_grpo_with_math_answer(tmp_path, capsys):
    """`fastppo demo --task arithmetic` on a tiny plan: every stage runs, the policy is scored by math_answer
    (no reward model), and the summary holds the held-out accuracy before and after."""
    from fastppo.demos.arithmetic import ArithmeticPlan, run_arithmetic_demo

    plan = ArithmeticPlan(n_sft=64, n_prompts=32, n_eval_prompts=16, sft_epochs=1.0, iterations=2,
                          prompts_per_iteration=4, samples_per_prompt=4, minibatch_size=16)
    summary = run_arithmetic_demo(tmp_path / "demo", plan=plan, progress_bar=False)
    acc = summary["held_out_accuracy"]
    assert set(acc) == {"sft", "grpo"} and all(0 <= v <= 1 for v in acc.values())
    records = read_metrics(tmp_path / "demo" / "grpo")
    assert len(records) == 2 and "reward_fn/fastppo.rewards:math_answer/mean" in records[-1]
    assert "held-out accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("name, signature", [("two_args", r"\(prompt, response\)"),
                                             ("record_keyword_only", r"\(prompt, response, \*, record\)")])
def test_a_function_of_another_signature_is_refused_at_start_up(name, signature):
    """Not after the models load and a rollout is sampled, blamed on a prompt, with advice to score it invalid."""
    with pytest.raises(UnusableRewardFunction, match=rf"reward\.functions\[0\]\.name: {MODULE}:{name}{signature} cannot "
                                                     r"be called as fn\(prompt_text, response_text, record\) \(.*\): "
                                                     r"give it these three parameters"):
        _fns((name, 1.0))
    assert issubclass(UnusableRewardFunction, ValueError)              # wrong input: the command line exits 2


def test_a_function_raising_on_every_response_is_warned_about(scorer, logged):
    out = scorer(("always_raises", 1.0), ("length", 1.0), function_errors="invalid").score(["p", "p"], ["a", "bb"],
                                                                                          [{}, {}], [0, 1])
    assert out.errors == 2 and out.totals == [1.0, 2.0]
    assert [m for m in logged if m.startswith(f"WARNING reward function {MODULE}:always_raises (reward.functions[0]) "
                                              "raised on every one of the 2 responses: it gives no signal")]
    assert not [m for m in logged if "length" in m]


def test_a_numpy_bool_counts_like_a_bool():
    assert call_function(f"{MODULE}:returns_np_bool", "p", "the fox", {}) == 1.0


def test_reward_functions_of_weight_zero_are_no_reward():
    base = ["model.policy_path=p", "data.prompt_path=d", f"reward.functions=[{{name: '{MODULE}:length', weight: 0}}]"]
    with pytest.raises(ConfigError, match=r"field 'model\.reward_path': is null and reward\.functions is all weight 0"):
        load_config(None, base, preset="grpo")


def test_an_unusable_function_is_wrong_input_on_the_command_line(tmp_path, capsys):
    from fastppo.cli import main

    argv = ["train", "model.policy_path=p", "model.reward_path=r", "data.prompt_path=d", "run.device=cpu",
            f"reward.functions=[{{name: '{MODULE}:two_args'}}]", f"run.output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2                                             # before any model is loaded
    err = [line for line in capsys.readouterr().err.splitlines() if ": error" in line]
    assert len(err) == 1 and "fastppo train: error: reward.functions[0].name: " in err[0], err
