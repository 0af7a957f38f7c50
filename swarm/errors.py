"""Errors a user of the client or an operator of a peer may see."""


class SwarmError(Exception):
    """Base class of every error this project raises on purpose."""


class MissingBlocksError(SwarmError):
    """No chain of online peers covers the blocks asked for."""

    def __init__(self, model_prefix: str, missing_blocks: list[int], adapter: str = "", quantization: str = "any"):
        self.missing_blocks = missing_blocks
        with_adapter = f" with adapter {adapter!r}" if adapter else ""
        stored = "" if quantization == "any" else f" with {quantization} weights"
        super().__init__(
            f"no online peer of the swarm serves block(s) {_ranges(missing_blocks)} of model {model_prefix!r}"
            f"{with_adapter}{stored}; start a peer for them (swarm-peer serve ... --blocks START:END"
            f"{' --adapters PATH' if adapter else ''}{'' if quantization in ('any', 'none') else ' --quant ' + quantization})"
            " or wait for one to join"
        )


class RemoteError(SwarmError):
    """A peer refused or failed a request; `code` is the peer's reason (e.g. INVALID_ARGUMENT)."""

    def __init__(self, peer: str, code: str, message: str):
        self.peer, self.code, self.message = peer, code, message
        super().__init__(f"peer {peer} answered {code}: {message}")


class UnsupportedModelError(SwarmError):
    """The checkpoint's architecture has no family adapter."""


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts: list[str] = []
    for index in sorted(indices):
        if parts and index == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{index}"
        else:
            parts.append(str(index))
    return ", ".join(parts)
