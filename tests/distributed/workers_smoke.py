"""Worker functions for the launcher's own test."""


def echo(rank: int, world_size: int, *, word: str) -> tuple[int, int, str]:
    return rank, world_size, word


def fail(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 fails")
