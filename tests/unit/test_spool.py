"""Spool directories: one per recorder, locked while it runs, adopted by another recorder once it has ended."""

from __future__ import annotations

from pathlib import Path

from prompttrain.storage.spool import Spool, claim


def test_a_running_recorders_spool_is_left_alone_and_an_ended_ones_is_adopted_in_order(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    ended_directory, ended_lock = claim(root)
    ended = Spool(ended_directory, 1 << 20)
    ended.append([{"op": "insert", "row": {"n": 1}}])
    ended._new_segment(ended.segments())  # a second segment: the order must survive the move
    ended.append([{"op": "insert", "row": {"n": 2}}])
    mine_directory, mine_lock = claim(root)
    mine = Spool(mine_directory, 1 << 20)
    mine.append([{"op": "insert", "row": {"n": 0}}])

    assert mine.adopt(root) == 0  # its recorder still holds the lock
    assert ended_directory.exists()

    ended_lock.close()  # that recorder has ended
    assert mine.adopt(root) == 2
    assert not ended_directory.exists()
    replayed = []
    while (oldest := mine.oldest()) is not None:
        path, records = oldest
        replayed.extend(record["row"]["n"] for record in records)
        mine.remove(path)
    assert replayed == [0, 1, 2]
    mine_lock.close()


def test_claimed_directories_are_distinct_and_locked(tmp_path: Path) -> None:
    first, first_lock = claim(tmp_path)
    second, second_lock = claim(tmp_path)
    assert first != second
    assert Spool(second, 1 << 20).adopt(tmp_path) == 0 and first.exists()
    first_lock.close()
    second_lock.close()
