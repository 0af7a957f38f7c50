"""Choosing the next token from logits the way OpenAI's fields ask, with `transformers`' own logits processors (so a
seeded request samples exactly what local `generate(do_sample=True, ...)` samples after `torch.manual_seed(seed)`)."""

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, over the tokens generated so far (not the prompt's, as vLLM does):
    logit -= presence * [count > 0] + frequency * count."""

    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: token id -> a value added to its logit (-100 bans it, 100 all but forces it)."""

    def __init__(self, bias: dict[int, float], vocab_size: int):
        self.bias = torch.zeros(vocab_size)
        for token, value in bias.items():
            self.bias[token] = value

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores + self.bias[: scores.shape[-1]]


class Sampler:
    """One request's token chooser: penalties and warpers in `generate`'s order, then argmax or a draw from the
    request's own random generator (requests running at the same time never share random state)."""

    def __init__(self, params: SamplingParams, prompt_length: int, vocab_size: int):
        self.params = params
        self.processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.presence_penalty or params.frequency_penalty:
            self.processors.append(OpenAIPenalties(params.presence_penalty, params.frequency_penalty, prompt_length))
        if params.logit_bias:
            self.processors.append(LogitBias(params.logit_bias, vocab_size))
        if not params.greedy:
            if params.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                self.processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(params.top_p))
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def choose(self, input_ids: torch.LongTensor, logits: torch.Tensor) -> torch.LongTensor:
        """The next token of each row [batch], from the last position's logits [batch, vocab] (float32)."""
        scores = self.processors(input_ids, logits)
        if self.params.greedy:
            return scores.argmax(dim=-1)
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=self.generator).squeeze(1)
