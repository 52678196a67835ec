"""The serving cache keeps one conversion per HF MoE directory: a new conversion of a directory (its key changes
with every re-export into it) removes that directory's earlier ones once they are old enough that no starting server
still reads them, and nothing of other directories."""

from __future__ import annotations

import os
import time

from switchyard.serve import loading


def test_a_new_conversion_removes_the_same_directorys_old_ones(tmp_path):
    cache, src, other_src = tmp_path / "adopted", tmp_path / "m" / "export", tmp_path / "n" / "export"
    src.mkdir(parents=True), other_src.mkdir(parents=True)

    def conversion(name: str, source, age_s: float):
        entry = cache / name
        entry.mkdir(parents=True)
        (entry / loading.SOURCE_MARK).write_text(str(source.resolve()))
        then = time.time() - age_s
        os.utime(entry / loading.SOURCE_MARK, (then, then))
        return entry

    old = conversion("export-aaaa", src, 2 * loading.PRUNE_AFTER_S)
    recent = conversion("export-bbbb", src, 60)  # a server may be starting from it
    elsewhere = conversion("export-cccc", other_src, 2 * loading.PRUNE_AFTER_S)  # same name, another directory
    unmarked = cache / "export-dddd"  # written before conversions were marked: left alone
    unmarked.mkdir()
    new = cache / "export-eeee"
    new.mkdir()
    loading._prune_older_conversions(src, new)
    assert not old.exists() and recent.exists() and elsewhere.exists() and unmarked.exists()
    assert (new / loading.SOURCE_MARK).read_text() == str(src.resolve())
