"""How the GPU runner's prefill graphs cut a segment into pieces (`server.model.gpu_prefill.pieces`)."""

from __future__ import annotations

from server.model.gpu_prefill import MAX_GRAPH_LEN, MIN_GRAPH_LEN, PAD_TAIL, pieces


def test_pieces_cover_the_segment_in_powers_of_two_with_only_the_tail_padded() -> None:
    for n in [*range(1, 2 * PAD_TAIL + 3), 1023, MAX_GRAPH_LEN, 5 * MAX_GRAPH_LEN + 7, 8 * MAX_GRAPH_LEN]:
        parts = pieces(n)
        sizes = [size for size, _ in parts]
        assert sum(real for _, real in parts) == n
        assert all(s & (s - 1) == 0 and MIN_GRAPH_LEN <= s <= MAX_GRAPH_LEN for s in sizes)
        assert all(size == real for size, real in parts[:-1])  # whole pieces, largest first
        assert sizes[:-1] == sorted(sizes[:-1], reverse=True)
        size, real = parts[-1]
        assert 0 < real <= size and (
            size == real or (real < PAD_TAIL and size < 2 * max(real, MIN_GRAPH_LEN))
        )


def test_a_follow_up_turn_is_one_replay_and_long_segments_pad_only_their_tail() -> None:
    assert pieces(90) == [(128, 90)]
    assert pieces(5) == [(MIN_GRAPH_LEN, 5)]
    assert pieces(2100) == [(1024, 1024), (1024, 1024), (64, 52)]
    assert pieces(1000) == [(512, 512), (256, 256), (256, 232)]
