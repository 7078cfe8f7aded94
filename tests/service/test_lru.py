"""``Lru``, the one bounded map the server keeps things in between requests."""

from __future__ import annotations

from lrserve.service.lru import Lru


def test_the_least_recently_used_go_first_past_the_weight_or_the_count():
    kept: Lru[str, str] = Lru(10, lambda _, value: len(value), most_items=3)
    for key in "abc":
        kept.put(key, key * 3)  # 9 of 10
    assert kept.get("a", touch=True) == "aaa"  # b is now the least recently used
    kept.put("d", "dd")  # 11: b goes
    assert "b" not in kept and kept.values() == ["ccc", "aaa", "dd"]
    kept.put("e", "e")  # 4 items: c goes
    assert kept.values() == ["aaa", "dd", "e"] and len(kept) == 3
    kept.get("dd")  # without touch: the order stays
    kept.put("f", "f" * 11)  # alone over the bound: not kept
    assert "f" not in kept and kept.values() == ["aaa", "dd", "e"]
    assert kept.pop("aaa") is None  # not a key: nothing happens
    assert kept.pop("a") == "aaa"
    assert kept.values() == ["dd", "e"]
    kept.put("g", "g" * 7)  # 10: all stay
    assert kept.values() == ["dd", "e", "g" * 7]


def test_a_value_kept_before_stays_where_keep_old_says_so():
    kept: Lru[str, int] = Lru(100, lambda _, value: 1)
    kept.put("a", 5)
    kept.put("a", 3, keep_old=lambda old: old > 3)
    assert kept.get("a") == 5
    kept.put("a", 7, keep_old=lambda old: old > 7)
    assert kept.get("a") == 7
