"""How the GPU runner's prefill graphs cut a segment into pieces (`server.model.gpu_prefill.pieces`)."""

from __future__ import annotations

from server.model.gpu_prefill import MAX_GRAPH_LEN, MIN_GRAPH_LEN, PIECE_COST, pieces


def _cost(parts: list[tuple[int, int]]) -> int:
    return sum(PIECE_COST + size for size, _ in parts)


def _greedy(n: int) -> list[tuple[int, int]]:
    """The earlier rule: binary pieces largest first while 256 tokens remain, then one padded piece."""
    out, bit = [], MAX_GRAPH_LEN
    while n >= 256:
        while bit > n:
            bit //= 2
        out.append((bit, bit))
        n -= bit
    return [*out, (max(MIN_GRAPH_LEN, 1 << (n - 1).bit_length()), n)] if n else out


def test_pieces_cover_the_segment_in_powers_of_two_with_only_the_last_padded() -> None:
    for n in [*range(1, 2 * MAX_GRAPH_LEN + 3), 5 * MAX_GRAPH_LEN + 7, 8 * MAX_GRAPH_LEN]:
        parts = pieces(n)
        sizes = [size for size, _ in parts]
        assert sum(real for _, real in parts) == n
        assert all(s & (s - 1) == 0 and MIN_GRAPH_LEN <= s <= MAX_GRAPH_LEN for s in sizes)
        assert all(size == real for size, real in parts[:-1])  # whole pieces, largest first
        assert sizes == sorted(sizes, reverse=True)
        size, real = parts[-1]
        assert 0 < real <= size < 2 * max(real, MIN_GRAPH_LEN)


def test_no_cheaper_than_one_padded_piece_or_the_binary_pieces() -> None:
    for n in range(1, 3 * MAX_GRAPH_LEN):
        whole = [(MAX_GRAPH_LEN, MAX_GRAPH_LEN)] * (n // MAX_GRAPH_LEN)
        rest = n % MAX_GRAPH_LEN
        one = [*whole, (max(MIN_GRAPH_LEN, 1 << (rest - 1).bit_length()), rest)] if rest else whole
        assert _cost(pieces(n)) <= min(_cost(one), _cost(_greedy(n)))


def test_a_follow_up_turn_is_one_replay_and_a_tail_just_short_of_a_piece_is_one_more() -> None:
    assert pieces(90) == [(128, 90)]
    assert pieces(5) == [(MIN_GRAPH_LEN, 5)]
    assert pieces(2100) == [(1024, 1024), (1024, 1024), (64, 52)]
    # a first turn's last step, split 3 tokens before the prompt's end at the user message's end
    assert pieces(8189) == [(1024, 1024)] * 7 + [(1024, 1021)]  # was 7 + 512 + 256 + (256, 253)
    assert pieces(1000) == [(1024, 1000)]
    assert pieces(600) == [(512, 512), (128, 88)]  # 412 tokens of padding cost more than a replay
