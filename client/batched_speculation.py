"""Speculative decoding of several sequences at once through the swarm (transformers' assisted generation takes one).

Each row drafts on its own (prompt lookup, or its own generator of the assistant model with the row's own draft
cache), rows padded on the left as generate pads them. One step through the peers verifies every row's draft, padded
to the longest; every row then keeps the draft tokens that all unfinished rows had right, plus the model's own token
after them. All rows advance together, so the peers' caches (one length for the whole batch) roll back to one place
with the next step, as for one sequence. A row whose draft was right for longer waits for the others: the batch moves
at the pace of its least predictable row, and each row's tokens are those of plain greedy decoding of the batch.

Greedy decoding only: sampling would need a reference to check a batch's randomness against, which transformers
does not define for assisted generation of several sequences.
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

from client.speculation import SpeculationReport


class BatchedSpeculationError(ValueError):
    pass


def row_drafters(model, generation_config, input_ids: torch.LongTensor, inputs_tensor, logits_processor,
                 model_kwargs: dict, assistant_model) -> list[CandidateGenerator]:
    """One of transformers' candidate generators per row (its own attention-mask row, and draft cache)."""
    if generation_config.do_sample:
        raise BatchedSpeculationError("speculative decoding of several sequences is greedy only (do_sample=False); "
                                      "sample them one at a time, or without a draft")
    if generation_config.return_dict_in_generate or generation_config.num_return_sequences > 1:
        raise BatchedSpeculationError("speculative decoding of several sequences returns the sequences only "
                                      "(no return_dict_in_generate, one sequence per prompt)")
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


def batched_assisted_greedy(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria,
                            generation_config, drafters: list[CandidateGenerator], model_kwargs: dict,
                            report: SpeculationReport) -> torch.LongTensor:
    """transformers' assisted decoding loop for a batch (see the module docstring); returns the sequences. `report`
    gets, per step, the longest draft and the draft tokens all rows kept."""
    pad = generation_config._pad_token_tensor
    filler = int(pad) if pad is not None else 0  # after a row's draft: never kept, its logits never read
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    first = True
    while bool(unfinished.any()):
        length = input_ids.shape[1]
        room = generation_config.max_length - length - 1  # drafts past it could not be kept
        drafts = [_draft(drafter, input_ids[row:row + 1], room) if unfinished[row] else input_ids.new_empty(0)
                  for row, drafter in enumerate(drafters)]
        longest = max(len(draft) for draft in drafts)
        padded = torch.stack([torch.cat([draft, draft.new_full((longest - len(draft),), filler)]) for draft in drafts])
        candidates = torch.cat([input_ids, padded], dim=1)
        encoder_decoder = model.config.is_encoder_decoder
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
        chosen = logits.argmax(dim=-1)  # the model's own token at each position: [batch, longest + 1]
        drafted = torch.tensor([len(draft) for draft in drafts], device=input_ids.device)
        right = torch.minimum((padded == chosen[:, :-1]).cumprod(dim=-1).sum(dim=-1), drafted)
        kept = int(right[unfinished].min())
        report.asked.append(longest)
        report.drafted.append(longest)
        report.accepted.append(kept)
        for row, drafter in enumerate(drafters):
            if drafts[row].numel():
                drafter.update_candidate_strategy(candidates[row:row + 1, :length + kept + 1],
                                                  logits[row:row + 1, :len(drafts[row]) + 1], int(right[row]))
        added = 0
        for column in range(kept + 1):  # as plain greedy decoding appends them, one token at a time
            tokens = chosen[:, column] if pad is None else torch.where(unfinished, chosen[:, column], pad)
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


def _draft(drafter: CandidateGenerator, row: torch.LongTensor, room: int) -> torch.LongTensor:
    if room <= 0:
        return row.new_empty(0)
    candidates, _ = drafter.get_candidates(row)
    return candidates[0, row.shape[1]:row.shape[1] + room]
