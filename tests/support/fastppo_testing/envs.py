"""Environments the tests name as "fastppo_testing.envs:<Class>" (importable in the worker processes)."""

from __future__ import annotations

import time

from .reward_fns import length


class Countdown:
    """Observes "left N" after each answer and ends after `turns` answers; each step earns 0.5 x its turn number."""

    def __init__(self, turns: int = 3) -> None:
        self.turns, self.step_no = turns, 0

    def reset(self, record: dict) -> str:
        return record["prompt"]

    def step(self, response: str):
        self.step_no += 1
        done = self.step_no >= self.turns
        return (None if done else f"left {self.turns - self.step_no}"), 0.5 * self.step_no, done

    def metrics(self) -> dict:
        return {"steps": self.step_no}


class ScoredOnce:
    """One answer, scored as the reward function `reward_fns.length` scores it: with env.max_turns=1 a run through
    this environment is the single-turn run with that function."""

    def reset(self, record: dict):
        return record["prompt"]

    def step(self, response: str):
        return None, length("", response, {}), True


class Forever:
    """Never done: every trajectory runs into env.max_turns or env.max_tokens."""

    def reset(self, record: dict):
        return record["prompt"]

    def step(self, response: str):
        return "go on", 1.0, False


class NoStep:
    def reset(self, record: dict):
        return record["prompt"]


class StepTakesNothing:
    def reset(self, record: dict):
        return record["prompt"]

    def step(self):
        return None, 1.0, True


class StepReturnsText:
    def reset(self, record: dict):
        return record["prompt"]

    def step(self, response: str):
        return "fine"


class ResetReturnsNumber:
    def reset(self, record: dict):
        return 3

    def step(self, response: str):
        return None, 1.0, True


class StepHangs:
    def reset(self, record: dict):
        return record["prompt"]

    def step(self, response: str):
        time.sleep(60)
        return None, 1.0, True


class StepRaises:
    def reset(self, record: dict):
        return record["prompt"]

    def step(self, response: str):
        raise ValueError("the grader is down")


not_a_class = 3


def slow_tool(seconds: float) -> str:
    time.sleep(seconds)
    return "late"


def failing_tool(x: int) -> int:
    raise ZeroDivisionError("no")


class LongerIsBetter(Countdown):
    """Countdown whose last step also pays 0.01 per character of the answer: rewards that differ between the samples
    of a group, so the critic-free estimators have a signal."""

    def step(self, response: str):
        observation, reward, done = super().step(response)
        return observation, reward + (0.01 * len(response) if done else 0.0), done
