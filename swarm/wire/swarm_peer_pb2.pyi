from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype", "codec")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    codec: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., codec: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("protocol_version", "model_prefix", "start_block", "end_block", "dtype", "cache_tokens_left", "hidden_size", "max_message_bytes", "largest_batch", "adapters", "quantization")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_LEFT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LARGEST_BATCH_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: str
    model_prefix: str
    start_block: int
    end_block: int
    dtype: str
    cache_tokens_left: int
    hidden_size: int
    max_message_bytes: int
    largest_batch: int
    adapters: _containers.RepeatedScalarFieldContainer[str]
    quantization: str
    def __init__(self, protocol_version: _Optional[str] = ..., model_prefix: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., dtype: _Optional[str] = ..., cache_tokens_left: _Optional[int] = ..., hidden_size: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., largest_batch: _Optional[int] = ..., adapters: _Optional[_Iterable[str]] = ..., quantization: _Optional[str] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "start_block", "end_block", "batch_size", "max_length", "alloc_timeout", "lora", "lora_scaling", "adapter", "deep_prompts", "compression")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ALLOC_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    LORA_SCALING_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    DEEP_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_block: int
    end_block: int
    batch_size: int
    max_length: int
    alloc_timeout: float
    lora: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    lora_scaling: float
    adapter: str
    deep_prompts: Tensor
    compression: str
    def __init__(self, session_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., alloc_timeout: _Optional[float] = ..., lora: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., lora_scaling: _Optional[float] = ..., adapter: _Optional[str] = ..., deep_prompts: _Optional[_Union[Tensor, _Mapping]] = ..., compression: _Optional[str] = ...) -> None: ...

class InferenceStep(_message.Message):
    __slots__ = ("session_id", "step_id", "hidden_states", "position_ids", "attention_mask", "beam_reorder", "start_position", "has_start_position", "push_to")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    BEAM_REORDER_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    HAS_START_POSITION_FIELD_NUMBER: _ClassVar[int]
    PUSH_TO_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_id: int
    hidden_states: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    beam_reorder: Tensor
    start_position: int
    has_start_position: bool
    push_to: _containers.RepeatedCompositeFieldContainer[PushTarget]
    def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., beam_reorder: _Optional[_Union[Tensor, _Mapping]] = ..., start_position: _Optional[int] = ..., has_start_position: _Optional[bool] = ..., push_to: _Optional[_Iterable[_Union[PushTarget, _Mapping]]] = ...) -> None: ...

class PushTarget(_message.Message):
    __slots__ = ("peer_id", "session_id")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    session_id: str
    def __init__(self, peer_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "step")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: InferenceStep
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[InferenceStep, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "max_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_length: int
    def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "hidden_states", "position", "pushed", "push_error", "input_digest")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    PUSHED_FIELD_NUMBER: _ClassVar[int]
    PUSH_ERROR_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden_states: Tensor
    position: int
    pushed: bool
    push_error: str
    input_digest: bytes
    def __init__(self, step_id: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., pushed: _Optional[bool] = ..., push_error: _Optional[str] = ..., input_digest: _Optional[bytes] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("step_id", "code", "message")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    code: str
    message: str
    def __init__(self, step_id: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("opened", "result", "error")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    result: StepResult
    error: StepError
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ...) -> None: ...

class PushSummary(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("start_block", "end_block", "hidden_states", "position_ids", "attention_mask", "deep_prompts", "lora", "lora_scaling", "adapter", "compression", "keep_activations")
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    DEEP_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    LORA_SCALING_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    KEEP_ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    start_block: int
    end_block: int
    hidden_states: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    deep_prompts: Tensor
    lora: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    lora_scaling: float
    adapter: str
    compression: str
    keep_activations: bool
    def __init__(self, start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., deep_prompts: _Optional[_Union[Tensor, _Mapping]] = ..., lora: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., lora_scaling: _Optional[float] = ..., adapter: _Optional[str] = ..., compression: _Optional[str] = ..., keep_activations: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden_states", "activations")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    activations: bytes
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., activations: _Optional[bytes] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("inputs", "grad_outputs", "activations")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    inputs: ForwardRequest
    grad_outputs: Tensor
    activations: bytes
    def __init__(self, inputs: _Optional[_Union[ForwardRequest, _Mapping]] = ..., grad_outputs: _Optional[_Union[Tensor, _Mapping]] = ..., activations: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_hidden_states", "grad_deep_prompts", "grad_lora")
    GRAD_HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    GRAD_DEEP_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_LORA_FIELD_NUMBER: _ClassVar[int]
    grad_hidden_states: Tensor
    grad_deep_prompts: Tensor
    grad_lora: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, grad_hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., grad_deep_prompts: _Optional[_Union[Tensor, _Mapping]] = ..., grad_lora: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class DialBackRequest(_message.Message):
    __slots__ = ("port", "certificate", "identity", "dht_port")
    PORT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    DHT_PORT_FIELD_NUMBER: _ClassVar[int]
    port: int
    certificate: bytes
    identity: str
    dht_port: int
    def __init__(self, port: _Optional[int] = ..., certificate: _Optional[bytes] = ..., identity: _Optional[str] = ..., dht_port: _Optional[int] = ...) -> None: ...

class DialBackResponse(_message.Message):
    __slots__ = ("observed_host", "reachable", "dht_reachable", "error")
    OBSERVED_HOST_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    DHT_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    observed_host: str
    reachable: bool
    dht_reachable: bool
    error: str
    def __init__(self, observed_host: _Optional[str] = ..., reachable: _Optional[bool] = ..., dht_reachable: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...
