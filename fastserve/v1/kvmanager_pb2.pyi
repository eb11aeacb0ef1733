from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConfigureRequest(_message.Message):
    __slots__ = ("num_gpu_blocks", "num_host_blocks", "block_size", "swap_policy", "reserve_blocks")
    NUM_GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SWAP_POLICY_FIELD_NUMBER: _ClassVar[int]
    RESERVE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_gpu_blocks: int
    num_host_blocks: int
    block_size: int
    swap_policy: str
    reserve_blocks: int
    def __init__(self, num_gpu_blocks: _Optional[int] = ..., num_host_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., swap_policy: _Optional[str] = ..., reserve_blocks: _Optional[int] = ...) -> None: ...

class ConfigureResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobDemand(_message.Message):
    __slots__ = ("request_id", "num_tokens", "held_blocks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HELD_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    held_blocks: int
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., held_blocks: _Optional[int] = ...) -> None: ...

class JobHint(_message.Message):
    __slots__ = ("request_id", "enst")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    enst: float
    def __init__(self, request_id: _Optional[str] = ..., enst: _Optional[float] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("iteration", "batch", "waiting", "free")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    batch: _containers.RepeatedCompositeFieldContainer[JobDemand]
    waiting: _containers.RepeatedCompositeFieldContainer[JobHint]
    free: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, iteration: _Optional[int] = ..., batch: _Optional[_Iterable[_Union[JobDemand, _Mapping]]] = ..., waiting: _Optional[_Iterable[_Union[JobHint, _Mapping]]] = ..., free: _Optional[_Iterable[str]] = ...) -> None: ...

class BlockTable(_message.Message):
    __slots__ = ("request_id", "blocks", "offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    blocks: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, request_id: _Optional[str] = ..., blocks: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class BlockCopy(_message.Message):
    __slots__ = ("src", "dst")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    src: int
    dst: int
    def __init__(self, src: _Optional[int] = ..., dst: _Optional[int] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("tables", "deferred", "swap_in", "swap_out", "prefetch", "swapped_in", "swapped_out", "recompute", "free_gpu_blocks", "free_host_blocks")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_FIELD_NUMBER: _ClassVar[int]
    SWAP_IN_FIELD_NUMBER: _ClassVar[int]
    SWAP_OUT_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_IN_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_OUT_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    FREE_GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[BlockTable]
    deferred: _containers.RepeatedScalarFieldContainer[str]
    swap_in: _containers.RepeatedCompositeFieldContainer[BlockCopy]
    swap_out: _containers.RepeatedCompositeFieldContainer[BlockCopy]
    prefetch: _containers.RepeatedCompositeFieldContainer[BlockCopy]
    swapped_in: _containers.RepeatedScalarFieldContainer[str]
    swapped_out: _containers.RepeatedScalarFieldContainer[str]
    recompute: _containers.RepeatedScalarFieldContainer[str]
    free_gpu_blocks: int
    free_host_blocks: int
    def __init__(self, tables: _Optional[_Iterable[_Union[BlockTable, _Mapping]]] = ..., deferred: _Optional[_Iterable[str]] = ..., swap_in: _Optional[_Iterable[_Union[BlockCopy, _Mapping]]] = ..., swap_out: _Optional[_Iterable[_Union[BlockCopy, _Mapping]]] = ..., prefetch: _Optional[_Iterable[_Union[BlockCopy, _Mapping]]] = ..., swapped_in: _Optional[_Iterable[str]] = ..., swapped_out: _Optional[_Iterable[str]] = ..., recompute: _Optional[_Iterable[str]] = ..., free_gpu_blocks: _Optional[int] = ..., free_host_blocks: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVStats(_message.Message):
    __slots__ = ("num_gpu_blocks", "num_host_blocks", "free_gpu_blocks", "free_host_blocks", "num_jobs", "blocks_swapped_out", "blocks_swapped_in", "recomputes")
    NUM_GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_JOBS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_SWAPPED_OUT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_SWAPPED_IN_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTES_FIELD_NUMBER: _ClassVar[int]
    num_gpu_blocks: int
    num_host_blocks: int
    free_gpu_blocks: int
    free_host_blocks: int
    num_jobs: int
    blocks_swapped_out: int
    blocks_swapped_in: int
    recomputes: int
    def __init__(self, num_gpu_blocks: _Optional[int] = ..., num_host_blocks: _Optional[int] = ..., free_gpu_blocks: _Optional[int] = ..., free_host_blocks: _Optional[int] = ..., num_jobs: _Optional[int] = ..., blocks_swapped_out: _Optional[int] = ..., blocks_swapped_in: _Optional[int] = ..., recomputes: _Optional[int] = ...) -> None: ...
