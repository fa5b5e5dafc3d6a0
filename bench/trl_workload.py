"""TRL's PPOTrainer on bench/trainer.py's workload: one worker process, results as JSON.

    .venv-trl/bin/python bench/trl_workload.py WORKLOAD.json RESULT.json

bench/trainer.py writes WORKLOAD.json (model directories, prompts, every
workload knob), starts this script with the TRL venv's interpreter, and reads
RESULT.json back. It imports only torch, transformers, datasets and trl
(1.12.0, `trl.experimental.ppo`, the last release that ships PPO), never
the fastppo package, so the two venvs stay independent (it loads the one
file fastppo/memory.py by path, which imports only torch);
`make bench-trl-venv` builds `.venv-trl`.

The workload is fastppo's, mapped onto PPOConfig:

    rollout batch 64   = per_device_train_batch_size (micro-batch 16) x gradient_accumulation_steps (4)
    minibatch 32       = rollout batch / num_mini_batches (2)
    generate / score   = local_rollout_forward_batch_size rows at a time (both frameworks use 16)
    32 new tokens      = response_length; no stop token, so every response has the full 32 tokens

and fp32, no gradient checkpointing, no bf16 autocast, no sample generations,
no checkpoints, no reporting integrations.

Optimizer steps: TRL steps through accelerate's `accumulate`, which syncs
every `gradient_accumulation_steps` micro-batches (4 here: one step per two
minibatches), and every micro-batch while the one-batch-per-epoch dataloader
sits at its end. We set accelerate's count to the micro-batches of one
minibatch and turn off the dataloader sync, so TRL takes one step per
minibatch like fastppo (8 per iteration here); the step count is measured
and reported, not assumed.

Phase times come from wrapping four names TRL's training loop calls (the
code of the loop runs unchanged):

    rollout         dataloader fetch -> end of `batch_generation` (sampling with output_scores)
    score           -> end of the last `get_reward` (old logprobs from the generation logits, ref, value, reward forwards)
    shape+adv       -> first `forward` with grad enabled (KL rewards, GAE loop, whitening)
    update          -> the trainer's `log` call (PPO epochs x minibatches x micro-batches, optimizer steps)
    other           -> next dataloader fetch (metrics, callbacks, gc.collect)

Peak memory is read the way fastppo's trainer reads it, at the end of the last
iteration, with the function fastppo's trainer uses (fastppo/memory.py): the
process's peak RSS (VmHWM) on CPU, torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path


def _load_module(name: str, path: Path):
    """A file by path, not as part of a package: this venv has no fastppo, and these files import only torch
    and the standard library."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


memory = _load_module("fastppo_memory", Path(__file__).resolve().parent.parent / "fastppo" / "memory.py")
forced_lengths = _load_module("forced_lengths", Path(__file__).resolve().parent / "forced_lengths.py")


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              LogitsProcessorList, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as loop

    rss_after_imports_mb = memory.status_mb("VmRSS")
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the parent hides GPUs for a CPU run

    # ---- models, tokenizer, prompts: the directories and file bench/trainer.py built ----------------
    tok = AutoTokenizer.from_pretrained(spec["policy_path"])
    load = dict(dtype=torch.float32, attn_implementation=spec["attn_implementation"])
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_path"], **load)
    if spec.get("lengths"):  # --lengths longtail: every response ends with EOS at its drawn length, as in fastppo
        forced = forced_lengths.ForcedLengths(spec["lengths"], prompt_len=spec["prompt_len"], eos_id=tok.eos_token_id,
                                              pad_id=tok.pad_token_id)
        base_generate = policy.generate
        policy.generate = lambda *a, **kw: base_generate(*a, logits_processor=LogitsProcessorList([forced]), **kw)
    ref = AutoModelForCausalLM.from_pretrained(spec["policy_path"], **load)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_path"], num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_path"], num_labels=1, **load)  # critic from RM
    prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts_path"]).read_text().splitlines()]
    ids = [tok(p)["input_ids"][-spec["prompt_len"]:] for p in prompts]
    assert all(len(x) == spec["prompt_len"] for x in ids), "prompts must tokenize to prompt_len tokens"
    dataset = Dataset.from_dict({"input_ids": ids})

    n, micro = spec["n_prompts"], spec["micro_batch"]
    args = PPOConfig(
        output_dir=spec["output_dir"], seed=spec["seed"], report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=n // micro,
        num_mini_batches=n // spec["minibatch"], num_ppo_epochs=spec["ppo_epochs"],
        total_episodes=n * spec["iterations"], local_rollout_forward_batch_size=spec["rollout_chunk"],
        response_length=spec["new_tokens"], temperature=spec["temperature"], stop_token=None,
        num_sample_generations=0, kl_coef=spec["kl_coef"], kl_estimator="k1", gamma=spec["gamma"],
        lam=spec["lam"], cliprange=spec["clip_eps"], cliprange_value=spec["value_clip"],
        vf_coef=spec["vf_coef"], learning_rate=spec["lr"], dataloader_num_workers=0,
    )

    # ---- phase timestamps: wrap the names the loop calls ---------------------------------------------
    marks: list[dict] = []          # one dict of timestamps per iteration
    tokens: list[tuple[int, int]] = []  # (generated tokens, prompt + response tokens) per iteration
    peak: dict[str, float] = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def wrap(name, before=None, after=None):
        fn = getattr(loop, name)

        def wrapped(*a, **kw):
            if before:
                sync()
                before(a, kw)
            out = fn(*a, **kw)
            if after:
                sync()
                after(a, kw, out)
            return out

        setattr(loop, name, wrapped)

    def gen_done(a, kw, out):
        marks[-1]["gen_end"] = time.perf_counter()
        qr, queries = out[0], a[1]
        if spec.get("lengths"):  # real tokens only: ForcedLengths never samples the pad token, which fills ended rows
            real = int((qr != a[3]).sum())
            tokens.append((real - queries.numel(), real))
        else:
            tokens.append((qr.size(0) * (qr.size(1) - queries.size(1)), qr.numel()))

    def reward_done(a, kw, out):
        if "update_start" not in marks[-1]:
            marks[-1]["score_end"] = time.perf_counter()

    def forward_start(a, kw):
        if torch.is_grad_enabled() and "update_start" not in marks[-1]:
            marks[-1]["update_start"] = time.perf_counter()

    wrap("batch_generation", after=gen_done)
    wrap("get_reward", after=reward_done)
    wrap("forward", before=forward_start)

    class PeakMemory(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sync()
            peak["mb"] = memory.peak_memory_mb(device)

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, callbacks=[PeakMemory()])
    # One optimizer step per minibatch, as in fastppo (see the module docstring).
    trainer.accelerator.gradient_accumulation_steps = spec["minibatch"] // micro
    trainer.accelerator.gradient_state.plugin_kwargs["sync_with_dataloader"] = False
    steps = [0]
    trainer.optimizer.optimizer.register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    steps_at: list[int] = []

    class Fetch:
        """The dataloader, stamping the start of each iteration when its batch is fetched."""

        def __init__(self, dl):
            self.dl = dl

        def __iter__(self):
            for batch in self.dl:
                if marks:
                    marks[-1]["end"] = time.perf_counter()
                    steps_at.append(steps[0])
                marks.append({"start": time.perf_counter()})
                yield batch

    trainer.dataloader = Fetch(trainer.dataloader)
    base_log = trainer.log

    def log(logs, *a, **kw):
        sync()
        marks[-1].setdefault("update_end", time.perf_counter())
        return base_log(logs, *a, **kw)

    trainer.log = log
    trainer.train()
    sync()
    marks[-1]["end"] = time.perf_counter()
    steps_at.append(steps[0])

    iterations = []
    for i, m in enumerate(marks):
        iterations.append({
            "rollout_s": m["gen_end"] - m["start"],
            "score_s": m["score_end"] - m["gen_end"],
            "shape_advantages_s": m["update_start"] - m["score_end"],
            "update_s": m["update_end"] - m["update_start"],
            "iteration_s": m["end"] - m["start"],
            "generated_tokens": tokens[i][0],
            "total_tokens": tokens[i][1],
            "optimizer_steps": steps_at[i] - (steps_at[i - 1] if i else 0),
        })
    write_result(out_path, iterations, device=device, peak_mb=peak["mb"], rss_after_imports_mb=rss_after_imports_mb)
    return 0


def write_result(out_path: str, iterations: list[dict], *, device, peak_mb: float, rss_after_imports_mb: float) -> None:
    """A TRL worker's RESULT.json: versions, per-iteration records, peak memory (bench/trainer.py reads it)."""
    import torch
    import transformers
    import trl

    Path(out_path).write_text(json.dumps({
        "provider": "trl", "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                        "torch": torch.__version__},
        "device": str(device), "threads": torch.get_num_threads(), "iterations": iterations,
        "peak_memory_mb": peak_mb, "rss_after_imports_mb": rss_after_imports_mb,
    }, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[2].strip())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1], sys.argv[2]))
