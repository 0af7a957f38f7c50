"""Speculative decoding of several sequences at once through the swarm (transformers' assisted generation takes one).

Each row drafts on its own (prompt lookup, or its own generator of the assistant model with the row's own draft
cache), rows padded on the left as generate pads them. One step through the peers verifies every row's draft, padded
to the longest, and chooses each row's tokens as transformers does for one sequence (greedy; sampling, with
speculative sampling when the draft has logits). Every row then keeps as many draft tokens as all unfinished rows
had accepted, plus its next token: all rows advance together, so the peers' caches (one length for the whole batch)
roll back to one place with the next step, as for one sequence. A row that accepted more waits for the others: the
batch moves at the pace of its least predictable row. Greedy rows get plain greedy decoding's tokens; a sampled row
stays a sample of the model (each kept token was accepted or drawn as speculative sampling draws it, and where a row
stops depends on its past and on the other rows only). transformers defines no batched assisted sampling to compare
with: a local model with `BatchedAssistedDecoding` is the one-process reference.
"""

from __future__ import annotations

import copy

import torch
from transformers.generation.candidate_generator import (
    AssistedCandidateGenerator,
    CandidateGenerator,
    PromptLookupCandidateGenerator,
    _prepare_attention_mask,
    _prepare_position_ids,
)
from transformers.generation.utils import _speculative_sampling

from client.speculation import SpeculationReport


class BatchedSpeculationError(ValueError):
    pass


def row_drafters(model, generation_config, input_ids: torch.LongTensor, inputs_tensor, logits_processor,
                 model_kwargs: dict, assistant_model) -> list[CandidateGenerator]:
    """One of transformers' candidate generators per row (its own attention-mask row, and draft cache)."""
    if generation_config.return_dict_in_generate:  # (transformers refuses num_return_sequences > 1 itself)
        raise BatchedSpeculationError("speculative decoding of several sequences returns the sequences only "
                                      "(no return_dict_in_generate)")
    if generation_config.prompt_lookup_num_tokens is not None:
        lookup = PromptLookupCandidateGenerator(  # keeps no state of its own: one serves every row
            eos_token_id=generation_config._eos_token_tensor,
            num_output_tokens=generation_config.prompt_lookup_num_tokens,
            max_matching_ngram_size=generation_config.max_matching_ngram_size or 2,
            max_length=generation_config.max_length, logits_processor=logits_processor,
            vocab_size=model.config.get_text_config().vocab_size,
        )
        return [lookup] * input_ids.shape[0]
    if assistant_model is None or generation_config.assistant_early_exit is not None:
        raise BatchedSpeculationError("speculative decoding of several sequences takes prompt_lookup_num_tokens or "
                                      "an assistant_model")
    mask = model_kwargs.get("attention_mask")
    return [
        AssistedCandidateGenerator(
            input_ids=input_ids[row:row + 1], assistant_model=assistant_model, generation_config=generation_config,
            model_kwargs={} if mask is None else {"attention_mask": mask[row:row + 1]},
            inputs_tensor=None if inputs_tensor is None else inputs_tensor[row:row + 1], logits_processor=logits_processor,
        )
        for row in range(input_ids.shape[0])
    ]


class BatchedAssistedDecoding:
    """Mixed in before a transformers causal LM: assisted generation of one sequence is transformers' own, of several
    this module's. The swarm's models have it; a local model with it is the one-process reference of a batch."""

    last_speculation: SpeculationReport | None = None  # per step: the longest draft, and the draft tokens kept

    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                           streamer=None, inputs_tensor=None, assistant_model=None, assistant_tokenizer=None,
                           tokenizer=None, **model_kwargs):
        if input_ids.shape[0] == 1:
            return super()._assisted_decoding(
                input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
                inputs_tensor, assistant_model, assistant_tokenizer, tokenizer, **model_kwargs)
        if streamer is not None or assistant_tokenizer is not None:
            raise BatchedSpeculationError("speculative decoding of several sequences takes no streamer and no "
                                          "assistant of another tokenizer")
        drafters = row_drafters(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
                                assistant_model)
        self.last_speculation = SpeculationReport()
        return batched_assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config,
                                         drafters, model_kwargs, self.last_speculation)


def batched_assisted_decoding(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria,
                              generation_config, drafters: list[CandidateGenerator], model_kwargs: dict,
                              report: SpeculationReport) -> torch.LongTensor:
    """transformers' assisted decoding loop for a batch (see the module docstring); returns the sequences."""
    pad = generation_config._pad_token_tensor
    filler = int(pad) if pad is not None else 0  # after a row's draft: never kept, its logits never read
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    encoder_decoder = model.config.is_encoder_decoder
    first = True
    while bool(unfinished.any()):
        length = input_ids.shape[1]
        room = generation_config.max_length - length - 1  # drafts past it could not be kept
        drafts = [_draft(drafter, input_ids[row:row + 1], room) if unfinished[row] else (input_ids.new_empty(0), None)
                  for row, drafter in enumerate(drafters)]
        longest = max(len(draft) for draft, _ in drafts)
        padded = torch.stack([torch.cat([draft, draft.new_full((longest - len(draft),), filler)]) for draft, _ in drafts])
        candidates = torch.cat([input_ids, padded], dim=1)
        kwargs = _prepare_attention_mask(copy.copy(model_kwargs), candidates.shape[1], encoder_decoder)
        if (positions := kwargs.get("position_ids")) is not None and longest > 0:  # as transformers' loop extends them
            kwargs = _prepare_position_ids(kwargs, positions.shape[-1] + longest, encoder_decoder)
        inputs = model.prepare_inputs_for_generation(
            candidates, next_sequence_length=None if first else longest + 1, is_first_iteration=first, **kwargs)
        if "logits_to_keep" in inputs:
            inputs["logits_to_keep"] = longest + 1
        outputs = model(**inputs)
        logits = outputs.logits[:, -longest - 1:].to(torch.float32)
        for column in range(longest + 1):
            logits[:, column] = logits_processor(candidates[:, :length + column], logits[:, column])
        # each unfinished row's verified tokens: its draft tokens up to the first wrong one, then the model's own
        verified = [_verified(draft, draft_logits, logits[row:row + 1, :len(draft) + 1], generation_config.do_sample)
                    if unfinished[row] else None for row, (draft, draft_logits) in enumerate(drafts)]
        kept = min(len(tokens) - 1 for tokens in verified if tokens is not None)
        report.asked.append(longest)
        report.drafted.append(longest)
        report.accepted.append(kept)
        for row, drafter in enumerate(drafters):
            if verified[row] is not None and len(drafts[row][0]):
                drafter.update_candidate_strategy(candidates[row:row + 1, :length + kept + 1],
                                                  logits[row:row + 1, :len(drafts[row][0]) + 1], len(verified[row]) - 1)
        added = 0
        for column in range(kept + 1):  # as plain decoding appends them, one token at a time
            tokens = torch.stack([row_tokens[column] if row_tokens is not None else input_ids.new_tensor(filler)
                                  for row_tokens in verified])
            if pad is not None:
                tokens = torch.where(unfinished, tokens, pad)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=1)
            added += 1
            unfinished &= ~stopping_criteria(input_ids, None)
            if not bool(unfinished.any()):
                break
        outputs.past_key_values.crop(-(longest + 1 - added))  # the peers hold every token but the last one added
        model_kwargs = model._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=encoder_decoder, num_new_tokens=added)
        first = False
    return input_ids


def _draft(drafter: CandidateGenerator, row: torch.LongTensor, room: int) -> tuple[torch.LongTensor, torch.Tensor | None]:
    """A row's draft tokens (at most `room`) and, from an assistant model, its logits for them."""
    if room <= 0:
        return row.new_empty(0), None
    candidates, logits = drafter.get_candidates(row)
    drafted = min(candidates.shape[1] - row.shape[1], room)
    return candidates[0, row.shape[1]:row.shape[1] + drafted], None if logits is None else logits[:, :drafted]


def _verified(draft: torch.LongTensor, draft_logits: torch.Tensor | None, logits: torch.Tensor,
              do_sample: bool) -> torch.LongTensor:
    """One row's accepted draft tokens plus the model's next token, as transformers' loop chooses them for one
    sequence: greedy (argmax), speculative sampling (with the draft's logits), or sampling checked against the draft."""
    drafted = len(draft)
    if do_sample and draft_logits is not None and drafted:
        tokens, _ = _speculative_sampling(torch.cat([draft.new_zeros(1), draft])[None], draft_logits, drafted, logits)
        return tokens[0]
    if do_sample:
        chosen = torch.multinomial(logits[0].softmax(dim=-1), num_samples=1).squeeze(1)
    else:
        chosen = logits[0].argmax(dim=-1)
    right = int((draft == chosen[:drafted]).cumprod(dim=0).sum())
    return chosen[:right + 1]
