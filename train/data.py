"""Byte-level training data: seeded random windows of a text, one token per UTF-8 byte."""

from __future__ import annotations

from pathlib import Path

import torch

BUILTIN_CORPUS = Path(__file__).with_name("corpus.txt")
"""A short English essay about training neural networks, shipped with the package."""


def load_tokens(path: str | Path | None, *, seq_len: int) -> torch.Tensor:
    """Read a text file as a 1-D ``uint8`` tensor of byte token ids (0..255).

    ``path=None`` reads the built-in corpus. Raises ``FileNotFoundError`` if the file does
    not exist and ``ValueError`` if it holds fewer than ``seq_len + 1`` bytes (one window).
    """
    path = BUILTIN_CORPUS if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training text file not found: {path}")
    raw = path.read_bytes()
    if len(raw) < seq_len + 1:
        raise ValueError(
            f"training text {path} has {len(raw)} bytes; seq_len={seq_len} needs at least "
            f"{seq_len + 1} (one window of seq_len + 1 bytes)"
        )
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


class RandomWindows:
    """Endless ``(tokens, labels)`` batches of random windows of a byte tensor.

    Each batch holds ``batch_size`` windows of ``seq_len + 1`` consecutive bytes at start
    positions drawn from a private generator seeded with ``seed``; ``tokens`` are the first
    ``seq_len`` bytes and ``labels`` the last ``seq_len`` (both ``int64 [batch_size, seq_len]``).
    The generator state is the data position: :meth:`state_dict` / :meth:`load_state_dict`
    save and restore it. ``data`` must hold at least ``seq_len + 1`` bytes.
    """

    def __init__(self, data: torch.Tensor, *, batch_size: int, seq_len: int, seed: int) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def __iter__(self) -> RandomWindows:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = self.data.numel() - self.seq_len  # last valid start is numel - (seq_len + 1)
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        windows = self.data[starts[:, None] + self._offsets].long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sampler position (its generator state)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
