"""TRL's GRPOTrainer on bench/grpo.py's workload: one worker process, results as JSON.

    .venv-trl-grpo/bin/python bench/trl_grpo_workload.py WORKLOAD.json RESULT.json

bench/grpo.py writes WORKLOAD.json and starts this script with the interpreter of
a venv holding the current TRL release (`make bench-grpo-venv`: trl 1.16.0). It
imports torch, transformers, datasets and trl, never the fastppo package.

fastppo's workload mapped onto GRPOConfig:

    16 prompts x 8 samples      = generation batch 128 (steps_per_generation 8 x per_device_train_batch_size 16)
    minibatch 32 per opt. step  = per_device_train_batch_size 16 x gradient_accumulation_steps 2 -> 4 steps per batch
    one pass over each batch    = num_iterations 1
    64 new tokens               = max_completion_length; EOS suppressed, so every completion has 64 tokens
    no KL term                  = beta 0 (TRL then loads no reference model)
    token-mean loss             = loss_type "dapo" (TRL's default: the accumulated batch's token mean)
    group std scaling           = scale_rewards "group"

Phases, per generation batch (one fastppo iteration), from wrapping three methods:

    rollout    `_generate` (sampling)
    score      the rest of `_generate_and_score_completions` (old/ref logprobs when needed, rewards, advantages)
    update     the rest of the time until the next generation batch (forward/backward, optimizer steps)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from grpo_reward import even_words
from trl_workload import memory, write_result


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rss_after_imports_mb = memory.status_mb("VmRSS")
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tok = AutoTokenizer.from_pretrained(spec["policy_path"])
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_path"], dtype=torch.float32,
                                                  attn_implementation=spec["attn_implementation"])
    prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts_path"]).read_text().splitlines()]
    dataset = Dataset.from_dict({"prompt": prompts})

    g, micro, minibatch = spec["samples_per_prompt"], spec["micro_batch"], spec["minibatch"]
    batch = len(prompts) * g
    args = GRPOConfig(
        output_dir=spec["output_dir"], seed=spec["seed"], report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0,
        per_device_train_batch_size=micro, gradient_accumulation_steps=minibatch // micro,
        steps_per_generation=batch // micro, num_generations=g, num_iterations=1,
        max_steps=spec["iterations"] * (batch // minibatch), max_completion_length=spec["new_tokens"],
        temperature=spec["temperature"], top_p=1.0, top_k=0, beta=0.0, epsilon=spec["clip_eps"],
        loss_type="dapo", scale_rewards="group", learning_rate=spec["lr"], log_completions=False,
        generation_kwargs={"suppress_tokens": [tok.eos_token_id, tok.pad_token_id]},
    )

    def reward(prompts, completions, **_):
        return [even_words(p, c, {}) for p, c in zip(prompts, completions)]

    marks: list[dict] = []
    tokens: list[tuple[int, int]] = []
    peak: dict[str, float] = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps = [0]

    class PeakMemory(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # once per optimizer step
            sync()
            steps[0] += 1
            peak["mb"] = memory.peak_memory_mb(device)

    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tok,
                          callbacks=[PeakMemory()])
    base_score, base_generate = trainer._generate_and_score_completions, trainer._generate

    def score(inputs):
        sync()
        now = time.perf_counter()
        if marks:
            marks[-1]["end"] = now
            marks[-1]["steps_end"] = steps[0]
        marks.append({"start": now, "steps_start": steps[0]})
        out = base_score(inputs)
        sync()
        marks[-1]["score_end"] = time.perf_counter()
        mask = out["completion_mask"]
        tokens.append((int(mask.sum()), int(mask.sum() + out["prompt_mask"].sum())))
        return out

    def generate(prompts):
        out = base_generate(prompts)
        sync()
        marks[-1]["gen_end"] = time.perf_counter()
        return out

    trainer._generate_and_score_completions, trainer._generate = score, generate
    trainer.train()
    sync()
    marks[-1]["end"] = time.perf_counter()
    marks[-1]["steps_end"] = steps[0]

    iterations = [{
        "rollout_s": m["gen_end"] - m["start"], "score_s": m["score_end"] - m["gen_end"],
        "update_s": m["end"] - m["score_end"], "iteration_s": m["end"] - m["start"],
        "generated_tokens": tokens[i][0], "total_tokens": tokens[i][1],
        "optimizer_steps": m["steps_end"] - m["steps_start"],
    } for i, m in enumerate(marks)]
    write_result(out_path, iterations, device=device, peak_mb=peak["mb"], rss_after_imports_mb=rss_after_imports_mb)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[2].strip())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1], sys.argv[2]))
