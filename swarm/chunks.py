"""Messages larger than gRPC's message limit travel as streams of Chunks: the serialized message, cut in pieces."""

from collections.abc import Iterator

from google.protobuf.message import DecodeError, Message

from swarm.wire import swarm_peer_pb2 as pb

MAX_CHUNKED_MESSAGES = 16  # a chunked message may be this many times the message limit (both sides refuse more)


class ChunkedMessageError(Exception):
    pass


def to_chunks(message: Message, chunk_bytes: int) -> Iterator[pb.Chunk]:
    data = message.SerializeToString()
    for start in range(0, max(len(data), 1), chunk_bytes):
        yield pb.Chunk(data=data[start : start + chunk_bytes])


class ChunkAssembler:
    """Collects a stream's chunks (refusing more than `max_bytes` in all) and parses the message they form."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self._parts, self._size = max_bytes, [], 0

    def add(self, chunk: pb.Chunk) -> None:
        self._size += len(chunk.data)
        if self._size > self.max_bytes:
            raise ChunkedMessageError(f"the chunked message exceeds the limit of {self.max_bytes} bytes")
        self._parts.append(chunk.data)

    def message(self, message_type: type[Message]) -> Message:
        message = message_type()
        try:
            message.ParseFromString(b"".join(self._parts))
        except DecodeError:
            raise ChunkedMessageError(f"the chunks do not form a {message_type.__name__}") from None
        return message
