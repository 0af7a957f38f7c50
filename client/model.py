"""Causal LMs whose blocks run on the swarm: embeddings, final norm and LM head stay local.

`AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[...])` builds, for the checkpoint's family,
a subclass of that family's `transformers` causal LM with no local blocks; its `forward` sends hidden states
through a RemoteSequential, and `generate` is `transformers`' own, with the KV cache kept on the peers.
"""

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers.cache_utils import Cache
from transformers.generation.candidate_generator import (
    AssistedCandidateGenerator,
    EarlyExitCandidateGenerator,
    PromptLookupCandidateGenerator,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from client.batched_speculation import BatchedAssistedDecoding
from client.config import ClientConfig
from client.inference_session import InferenceSession
from client.remote_sequential import RemoteSequential
from client.speculation import MAX_ASSISTANT_TOKENS, AdaptiveDraftLength, SpeculationReport, record_drafts
from client.swarm_view import SwarmView
from client.transport import PeerConnections
from client.tuning import PromptTuning, RemoteLoRA
from client.verification import VerificationReport, WrongAnswerCaught
from swarm import huge_pages
from swarm.blocks import serving_config
from swarm.checkpoint import Checkpoint
from swarm.errors import SwarmError
from swarm.families import Family, family_for
from swarm.model_loading import load_parts, meta_model, meta_tensors

logger = logging.getLogger(__name__)

MAX_REGENERATIONS = 3  # liars caught within one generate call before it gives up
DRAFT_LENGTHS = ("adaptive", "fixed")  # generate(draft_length=...); None: adaptive for greedy decoding only


class RemotePastKeyValues(Cache):
    """Stands in for the KV cache, which lives on the peers: reports how many of the caller's tokens they hold
    (trained prompts before them are not the caller's), forwards reorders and crops (assisted generation drops
    the rejected draft tokens with `crop(-n)`: the peers roll back with the next step, no round trip of its own)."""

    def __init__(self, session: InferenceSession, num_prompt_tokens: int = 0):
        super().__init__(layers=[])
        self.session, self.num_prompt_tokens = session, num_prompt_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.session.position - self.num_prompt_tokens, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.session.reorder(beam_idx)

    @property
    def is_croppable(self) -> bool:
        return True

    def activate_past_recording(self) -> None:
        """The peers keep every token until told to roll back: nothing to switch on."""

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove < 0:
            self.session.rewind(self.session.position + tokens_to_remove)


class DistributedCausalLMMixin(BatchedAssistedDecoding):
    """Mixed in before a family's `...ForCausalLM`; see the module docstring."""

    family: Family
    remote: RemoteSequential

    def _attach_remote(self, family: Family, remote: RemoteSequential) -> None:
        self.family, self.remote = family, remote
        self._active_session: InferenceSession | None = None
        self._implicit_session: InferenceSession | None = None
        self.prompt_tuning: PromptTuning | None = None
        self.lora: RemoteLoRA | None = None
        self.last_verification: VerificationReport | None = None  # what the checks of the last generate found
        self.last_speculation: SpeculationReport | None = None  # the drafts of the last speculative generate
        self._draft_length: str | None = None
        self._call_report = VerificationReport()

    def _attach_tuning(self, mode: str | None, num_prefix_tokens: int, lora_config) -> None:
        if mode in ("ptune", "deep_ptune"):
            self.prompt_tuning = PromptTuning(
                num_prefix_tokens, self.config.hidden_size, self.config.num_hidden_layers, mode == "deep_ptune", self.dtype
            )
        elif mode == "lora":
            if lora_config is None:
                raise ValueError("tuning_mode='lora' needs lora_config=peft.LoraConfig(r=..., lora_alpha=..., target_modules=[...])")
            targets = lora_config.target_modules
            self.lora = RemoteLoRA(
                self.family, self.config, lora_config.r, lora_config.lora_alpha,
                [targets] if isinstance(targets, str) else sorted(targets), self.dtype,
            )
        elif mode is not None:
            raise ValueError(f"tuning_mode must be None, 'ptune', 'deep_ptune' or 'lora', not {mode!r}")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        hidden = self.family.embed(self, input_ids, position_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        prefix = 0
        if past_key_values is None:
            mask = self._mask_columns(attention_mask, length, batch)
            deep_prompts = None
            if self.prompt_tuning is not None:
                hidden, position_ids, mask, labels = self._prepend_prompts(hidden, position_ids, mask, labels)
                deep_prompts, prefix = self.prompt_tuning.batch_deep_prompts(batch), self.prompt_tuning.num_prefix_tokens
            hidden = self.run_blocks(hidden, position_ids, mask, deep_prompts)
        elif isinstance(past_key_values, RemotePastKeyValues):
            hidden, prefix = self._session_step(past_key_values.session, hidden, position_ids, attention_mask)
        else:
            raise TypeError(f"past_key_values must come from an inference session, not {type(past_key_values)}")
        hidden = self.family.final_norm(self, hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.family.logits(self, hidden[:, keep, :])
        loss = None
        if labels is not None:  # with prompts, the last prompt position predicts the first token (its label is kept)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        logits = logits[:, prefix:] if logits.shape[1] > prefix else logits
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    def _session_step(self, session: InferenceSession, hidden, position_ids, attention_mask) -> tuple[torch.Tensor, int]:
        """One step of generation on the peers; the trained prompts go first, before the first step's tokens.
        Returns the output and how many prompt positions lead it."""
        batch, length = hidden.shape[:2]
        mask = self._mask_columns(attention_mask, length, batch)
        if self.prompt_tuning is None:
            return session.step(hidden, position_ids, mask), 0
        prefix = self.prompt_tuning.num_prefix_tokens
        if session.position == 0:
            hidden, position_ids, mask, _ = self._prepend_prompts(hidden, position_ids, mask, None)
            return session.step(hidden, position_ids, mask), prefix
        if position_ids is not None:  # generate counts positions from the caller's tokens only
            position_ids = position_ids + prefix
        return session.step(hidden, position_ids, mask), 0

    def run_blocks(self, hidden, position_ids=None, mask=None, deep_prompts=None) -> torch.Tensor:
        """A stateless, differentiable pass through the remote blocks, with this model's LoRA factors if any."""
        if self.lora is None:
            return self.remote(hidden, position_ids, mask, deep_prompts)
        return self.remote(hidden, position_ids, mask, deep_prompts, self.lora.factors(), self.lora.scaling)

    def _prepend_prompts(self, hidden, position_ids, mask, labels):
        """Puts the trainable prompts before every sequence; positions, mask and labels make room for them."""
        batch, length = hidden.shape[:2]
        prefix = self.prompt_tuning.num_prefix_tokens
        prompts = self.prompt_tuning.prompts.to(hidden.dtype).expand(batch, -1, -1)
        hidden = torch.cat([prompts, hidden], dim=1)
        if position_ids is None:
            position_ids = torch.arange(length).expand(batch, length)
        position_ids = torch.cat([torch.arange(prefix).expand(batch, prefix), position_ids + prefix], dim=1)
        if mask is not None:
            mask = torch.cat([torch.ones(batch, prefix, dtype=torch.bool), mask], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full((batch, prefix), -100, dtype=labels.dtype), labels], dim=1)
        return hidden, position_ids, mask, labels

    @staticmethod
    def _mask_columns(attention_mask: torch.Tensor | None, length: int, batch: int) -> torch.Tensor | None:
        """The mask columns of the new tokens (generate passes the mask of the whole sequence so far)."""
        if attention_mask is None:
            return None
        if attention_mask.ndim != 2 or attention_mask.shape[0] != batch:
            raise ValueError(f"attention_mask must be 2-D [batch, length], got {list(attention_mask.shape)}")
        return attention_mask[:, -length:].bool()

    @contextlib.contextmanager
    def inference_session(self, max_length: int) -> Iterator[InferenceSession]:
        """Keeps one KV cache on the peers across several `generate` calls (pass the full sequence each time)."""
        if self._active_session is not None:
            raise SwarmError("an inference session is already active on this model")
        with self._open_session(max_length) as session:
            self._active_session = session
            try:
                yield session
            finally:
                self._active_session = None

    def _open_session(self, max_length: int) -> InferenceSession:
        lora = (self.lora.factors(), self.lora.scaling) if self.lora is not None else (None, 1.0)
        deep_prompts = self.prompt_tuning.deep_prompts if self.prompt_tuning is not None else None
        return self.remote.inference_session(max_length, *lora, deep_prompts)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        if model_kwargs.get("past_key_values") is not None:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        # prompt lookup drafts up to its number of tokens past max_length (transformers drops them after the check)
        max_cache_length += generation_config.prompt_lookup_num_tokens or 0
        session = self._active_session
        if session is None:
            session = self._implicit_session = self._open_session(max_cache_length)
        elif max_cache_length > session.max_length:
            raise SwarmError(
                f"this generation needs up to {max_cache_length} tokens but the session was opened with "
                f"max_length={session.max_length}"
            )
        prompts = self.prompt_tuning.num_prefix_tokens if self.prompt_tuning is not None else 0
        session.report = self._call_report
        model_kwargs["past_key_values"] = RemotePastKeyValues(session, prompts)

    def _get_candidate_generator(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
                                 assistant_model=None, target_tokenizer=None, assistant_tokenizer=None):
        """transformers' candidate generator for speculative decoding (prompt lookup, an assistant model, early exit),
        its draft length chosen step by step from the chain's timings (client/speculation.py) unless the call asked
        for draft_length="fixed", or samples without asking for "adaptive" (timed lengths would not repeat a seed)."""
        generator = super()._get_candidate_generator(
            generation_config=generation_config, input_ids=input_ids, inputs_tensor=inputs_tensor,
            logits_processor=logits_processor, model_kwargs=model_kwargs, assistant_model=assistant_model,
            target_tokenizer=target_tokenizer, assistant_tokenizer=assistant_tokenizer,
        )
        if type(generator) is PromptLookupCandidateGenerator:  # its configured length is what the session has room for
            length_attribute, longest = "num_output_tokens", generator.num_output_tokens
        elif type(generator) in (AssistedCandidateGenerator, EarlyExitCandidateGenerator):
            length_attribute, longest = "num_assistant_tokens", MAX_ASSISTANT_TOKENS
        else:
            return generator
        self.last_speculation = SpeculationReport()
        record_drafts(generator, length_attribute, self.last_speculation)
        if (self._draft_length or ("fixed" if generation_config.do_sample else "adaptive")) == "fixed":
            return generator
        cache = model_kwargs["past_key_values"]
        return AdaptiveDraftLength(generator, length_attribute, longest, cache.get_seq_length, self.last_speculation)

    def generate(self, inputs: torch.Tensor | None = None, *args, session: InferenceSession | None = None,
                 draft_length: str | None = None, **kwargs):
        """`transformers`' generate on the swarm. Inside `inference_session()`, pass the whole sequence each time, as
        with a local cache. With `session=` (Petals' way), or with no inputs inside an active session, the call
        continues that session: `inputs` are only the tokens after what it generated so far, and the result leaves
        those earlier tokens out. `draft_length` ("adaptive" or "fixed") is for speculative decoding: see
        `_get_candidate_generator`."""
        if draft_length not in (None, *DRAFT_LENGTHS):
            raise ValueError(f"draft_length must be one of {DRAFT_LENGTHS} or None, not {draft_length!r}")
        self._draft_length, self.last_speculation = draft_length, None
        try:
            return self._generate_in_session(inputs, *args, session=session, **kwargs)
        finally:
            self._draft_length = None

    def _generate_in_session(self, inputs, *args, session: InferenceSession | None, **kwargs):
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if session is None and inputs is None and self._active_session is not None:
            session = self._active_session
        if session is None:
            return self._generate_and_record(inputs, *args, **kwargs)
        earlier = 0 if session.output_ids is None else session.output_ids.shape[1]
        if earlier:
            inputs = session.output_ids if inputs is None else torch.cat([session.output_ids, inputs], dim=1)
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = torch.cat([session.output_mask, kwargs["attention_mask"]], dim=1)
        with self._using(session):
            result = self._generate_and_record(inputs, *args, **kwargs)
        if isinstance(result, torch.Tensor):
            later = result[:, earlier:]
            later.verification = result.verification
            return later
        result.sequences = result.sequences[:, earlier:]
        return result

    def _generate_and_record(self, inputs, *args, **kwargs):
        """Runs generate, checked (client/verification.py): if a peer is caught answering wrong, it is replaced and
        the call runs again from its start, with the random state it started with, so the tokens are those of a
        run without that peer. An active session remembers the tokens (and their mask) for a call that continues
        it. The result carries the checks' report as `.verification` (also `model.last_verification`)."""
        session = self._active_session
        rng, start = torch.random.get_rng_state(), 0 if session is None else session.position
        self._call_report = report = VerificationReport()
        for attempt in range(MAX_REGENERATIONS + 1):
            try:
                result = super().generate(inputs, *args, **kwargs)
                session = self._implicit_session or self._active_session
                if session is not None:
                    session.verify()
                break
            except WrongAnswerCaught as caught:
                if attempt == MAX_REGENERATIONS:
                    raise
                logger.warning(f"{caught}; generating again from the start of this call")
                torch.random.set_rng_state(rng)
                if self._active_session is not None:
                    self._active_session.rewind(start)
            finally:
                if self._implicit_session is not None:
                    self._implicit_session.close()
                    self._implicit_session = None
        self.last_verification = report
        session = self._active_session
        if session is not None:
            sequences = result if isinstance(result, torch.Tensor) else result.sequences
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(sequences)
            mask = mask.repeat_interleave(sequences.shape[0] // mask.shape[0], dim=0)  # num_return_sequences
            generated = sequences.shape[1] - mask.shape[1]
            session.output_ids = sequences
            session.output_mask = torch.cat([mask, mask.new_ones(mask.shape[0], generated)], dim=1)
        result.verification = report
        return result

    @contextlib.contextmanager
    def _using(self, session: InferenceSession) -> Iterator[None]:
        if self._active_session is not None and self._active_session is not session:
            raise SwarmError("another inference session is active on this model; generate(session=...) needs that one")
        previous, self._active_session = self._active_session, session
        try:
            yield
        finally:
            self._active_session = previous

    def save_lora(self, path: str | Path) -> Path:
        """Saves this model's client-owned LoRA as a peft adapter folder: load it with peft, or host it on peers with
        `swarm-peer serve --adapters NAME=PATH`."""
        if self.lora is None:
            raise SwarmError("this model trains no LoRA (tuning_mode='lora' gives it one)")
        return self.lora.save_peft(path, self.name_or_path)

    def close(self) -> None:
        """Leave the swarm: close connections and this client's DHT node."""
        self.remote.close()


class AutoDistributedModelForCausalLM:
    """Entry point: picks the family from the checkpoint's config.json."""

    @staticmethod
    def from_pretrained(
        model_path: str | Path,
        initial_peers: list[str] | tuple[str, ...] = (),
        dtype: torch.dtype | None = None,
        client_config: ClientConfig | None = None,
        tuning_mode: str | None = None,
        num_prefix_tokens: int = 16,
        lora_config=None,
        pre_seq_len: int | None = None,
        **client_options,
    ):
        """`tuning_mode`: None (frozen), "ptune", "deep_ptune" (`num_prefix_tokens` trainable prompts) or "lora"
        (client-owned LoRA on the remote blocks, shaped by a `peft.LoraConfig`); the tuned parameters are the only
        ones with requires_grad, so `torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)` trains them.
        `pre_seq_len` is Petals' name for `num_prefix_tokens`.
        """
        num_prefix_tokens = num_prefix_tokens if pre_seq_len is None else pre_seq_len
        checkpoint = Checkpoint(model_path)
        family = family_for(checkpoint.config)
        config = serving_config(checkpoint.config, family)
        dtype = dtype or checkpoint.checkpoint_dtype
        client_config = client_config or ClientConfig(initial_peers=list(initial_peers), **client_options)
        # The DHT node joins the swarm (in its own process) and the view reads it while the model is built here.
        view = SwarmView(
            checkpoint.model_prefix(), config.num_hidden_layers, client_config,
            PeerConnections(client_config.max_message_bytes), join_in_background=True,
        )
        try:
            model = _client_side_model(family, config, checkpoint, dtype).to(dtype).requires_grad_(False)
            huge_pages.move_parameters(model)  # (0.1-0.3 s for the benchmark model's 64 MB of embeddings and head)
            view.wait_joined()
        except BaseException:
            view.connections.close()
            view.shutdown()
            raise
        remote = RemoteSequential(checkpoint.model_prefix(), config.num_hidden_layers, client_config, view=view)
        model._attach_remote(family, remote)
        owner, _, name = family.layers_prefix.rpartition(".")  # where the blocks were: model.layers, transformer.h
        setattr(model.get_submodule(owner), name, remote)  # indexable and sliceable there, as in Petals
        model = model.eval()
        model._attach_tuning(tuning_mode, num_prefix_tokens, lora_config)
        return model


def _client_side_model(family: Family, config, checkpoint: Checkpoint, dtype: torch.dtype):
    """The family's causal LM with every client-side tensor loaded (embeddings, final norm, head) and no blocks."""
    model_class = type(f"Distributed{family.causal_lm_class.__name__}", (DistributedCausalLMMixin, family.causal_lm_class), {})
    model = meta_model(family, config, num_layers=0, model_class=model_class)  # the blocks are remote
    names = [name for name in checkpoint.weight_map if not name.startswith(f"{family.layers_prefix}.")]
    load_parts(model, family, [(model, names)], checkpoint, dtype, "cpu")
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight.is_meta:  # tied embeddings: the checkpoint holds the matrix once
        head.weight = embeddings.weight
    missing = meta_tensors(model)
    if missing:
        raise SwarmError(f"checkpoint {checkpoint.path} lacks client-side tensors: {missing[:5]}")
    model.config = config  # the real number of blocks, for generate and for users
    return model

