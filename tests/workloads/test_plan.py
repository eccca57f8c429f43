"""Partition plans: deterministic, every item exactly once, balanced by bytes, stored once."""
from __future__ import annotations

import json
import logging
import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trajflow.plan import PLAN_VERSION, Item, fingerprint, load_or_create_plan, partition, plan_document, shard_items
from trajflow.storage import PLAN_KEY

_items = st.lists(
    st.builds(Item, key=st.text(alphabet="abcdef/._0123456789", min_size=1, max_size=12), size=st.integers(0, 10**9)),
    max_size=80,
    unique_by=lambda it: it.key,
)
_shards = st.integers(1, 17)


@settings(max_examples=300, deadline=None)
@given(items=_items, shards=_shards, seed=st.integers(0, 2**32 - 1))
def test_partition_is_deterministic_whatever_the_listing_order(items, shards, seed):
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    assert partition(items, shards) == partition(shuffled, shards)
    assert plan_document(items, shards, "g") == plan_document(shuffled, shards, "g")


@settings(max_examples=300, deadline=None)
@given(items=_items, shards=_shards)
def test_every_item_lands_in_exactly_one_shard(items, shards):
    parts = partition(items, shards)
    assert len(parts) == shards
    placed = [it.key for part in parts for it in part]
    assert sorted(placed) == sorted(it.key for it in items)
    assert len(placed) == len(set(placed))
    for part in parts:
        assert [it.key for it in part] == sorted(it.key for it in part)  # stable order inside a shard


@settings(max_examples=300, deadline=None)
@given(items=_items, shards=_shards)
def test_no_shard_exceeds_the_ideal_by_more_than_the_largest_item(items, shards):
    parts = partition(items, shards)
    loads = [sum(it.size for it in part) for part in parts]
    total = sum(it.size for it in items)
    largest = max((it.size for it in items), default=0)
    assert sum(loads) == total
    assert max(loads) <= total / shards + largest
    # and no shard is lighter than the heaviest by more than the largest item
    assert min(loads) >= max(loads) - largest


def test_equal_items_spread_evenly():
    items = [Item(f"k{i:03d}", 100) for i in range(40)]
    assert [len(part) for part in partition(items, 8)] == [5] * 8


def test_zero_byte_items_spread_by_count():
    items = [Item(f"empty{i}", 0) for i in range(8)]
    assert [len(part) for part in partition(items, 4)] == [2] * 4


def test_items_of_unknown_size_spread_like_items_of_the_median_size():
    # presigned URLs refuse HEAD: their sizes are unknown and planned as 0
    unknown = [Item(f"url{i}", 0, meta={"size_known": False}) for i in range(8)]
    known = [Item(f"obj{i}", 100 * (i + 1)) for i in range(3)]  # median 200
    parts = partition(unknown + known, 4)
    counts = [sum(1 for it in part if not it.meta.get("size_known", True)) for part in parts]
    assert sorted(counts) == [1, 2, 2, 3]  # each unknown item weighs 200 bytes
    assert [len(part) for part in partition(unknown, 3)] == [3, 3, 2]


def test_more_shards_than_items_leaves_empty_shards():
    parts = partition([Item("a", 5), Item("b", 3)], 4)
    assert [[it.key for it in p] for p in parts] == [["a"], ["b"], [], []]


@pytest.mark.parametrize(
    "items,shards,match",
    [
        ([Item("a", 1), Item("a", 2)], 2, "duplicate item key 'a'"),
        ([Item("a", -1)], 1, "negative size"),
        ([Item("a", 1)], 0, "at least 1"),
        ([Item("a", 1)], True, "at least 1"),
    ],
)
def test_bad_partition_input_is_refused(items, shards, match):
    with pytest.raises(ValueError, match=match):
        partition(items, shards)


def test_duplicate_check_is_not_quadratic():
    items = [Item(f"k{i:06d}", i % 997) for i in range(60_000)]
    parts = partition(items, 16)  # a quadratic scan would take minutes here
    assert sum(len(p) for p in parts) == 60_000


def test_fingerprint_changes_with_the_listing():
    a = [Item("x", 1, "s3://b/x"), Item("y", 2, "s3://b/y")]
    assert fingerprint(a) == fingerprint(list(reversed(a)))
    assert fingerprint(a) != fingerprint([Item("x", 1, "s3://b/x"), Item("y", 3, "s3://b/y")])
    assert fingerprint(a) != fingerprint([Item("x", 1, "s3://b/x")])


def test_item_json_round_trip():
    item = Item("src/a.parquet", 10, "https://x/a.parquet", {"sha256": "ab"})
    assert Item.from_json(json.loads(json.dumps(item.to_json()))) == item
    assert Item.from_json(item.to_json()).meta == {"sha256": "ab"}


# ---- the stored plan -------------------------------------------------------------------


def test_plan_is_written_once_and_reused(storage, caplog, monkeypatch):
    listed = []

    def first_listing():
        listed.append(1)
        return [Item(f"k{i}", i * 10) for i in range(10)]

    plan = load_or_create_plan(storage, 3, "gen1", first_listing)
    assert plan["version"] == PLAN_VERSION and plan["shards"] == 3 and plan["generation"] == "gen1"
    assert storage.exists("plan/download-3-gen1/plan.json") and storage.exists(PLAN_KEY)
    # a pod reads the header and its own part: the header holds no items
    assert "assignments" not in plan and plan["items"] == 10
    assert sorted(i.key for i in storage.list("plan/download-3-gen1/")) == sorted([
        "plan/download-3-gen1/plan.json", "plan/download-3-gen1/planning/1.json",
        *(f"{plan['parts']}{s:05d}.json" for s in range(3))])

    # the source listing changes (a file appears): pods that start later still follow the plan
    def changed_listing():
        listed.append(2)
        return [Item(f"k{i}", i * 10) for i in range(11)]

    again = load_or_create_plan(storage, 3, "gen1", changed_listing)
    assert again == plan and listed == [1]
    assert sorted(it.key for s in range(3) for it in shard_items(storage, again, s)) == sorted(f"k{i}" for i in range(10))
    # another shard count makes a new plan and points plan/download.json at it
    replanned = load_or_create_plan(storage, 4, "gen1", changed_listing)
    assert replanned["shards"] == 4 and listed == [1, 2]
    assert json.loads(storage.read_bytes(PLAN_KEY)) == replanned
    # back to 3 shards, later: the 3-shard plan is used as it was made, without k10, and says so
    later = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: later)
    with caplog.at_level(logging.WARNING, logger="trajflow.plan"):
        assert load_or_create_plan(storage, 3, "gen1", changed_listing) == plan and listed == [1, 2]
    assert "(3 shards) lists other items than the plan in use (4 shards)" in caplog.text
    assert "planGeneration" in caplog.text


def test_a_pod_reads_the_small_header_and_its_own_part_only(local_storage, monkeypatch):
    items = [Item(f"k{i:05d}", 1 + i % 7) for i in range(10_000)]
    load_or_create_plan(local_storage, 8, "g", lambda: items)
    reads: list[str] = []
    read_bytes = local_storage.read_bytes
    monkeypatch.setattr(local_storage, "read_bytes", lambda key: reads.append(key) or read_bytes(key))
    plan = load_or_create_plan(local_storage, 8, "g", lambda: pytest.fail("listed again"))
    mine = shard_items(local_storage, plan, 5)
    assert reads == ["plan/download-8-g/plan.json", PLAN_KEY, f"{plan['parts']}00005.json"]
    assert len(mine) == 1250 and len(read_bytes(PLAN_KEY)) < 1024  # what `trajflow wait` reads on each poll


def test_pods_whose_listings_partition_differently_never_mix_their_parts(local_storage, monkeypatch):
    # the same keys and sizes (one fingerprint), but one pod could not size `s/empty` (HEAD
    # failed): weighted as a typical item, it lands on another shard than a known 0 bytes does
    sizes = {"s/a": 300, "s/b": 200, "s/c": 100, "s/empty": 0}
    known = [Item(k, n) for k, n in sizes.items()]
    guessed = [Item(k, n, meta={"size_known": k != "s/empty"}) for k, n in sizes.items()]
    assert fingerprint(known) == fingerprint(guessed) and partition(known, 2) != partition(guessed, 2)
    plan = load_or_create_plan(local_storage, 2, "g", lambda: known)
    in_use = [[it.key for it in shard_items(local_storage, plan, s)] for s in (0, 1)]
    # a pod that found no plan when it looked, and lost the race to write its own
    exists = local_storage.exists
    monkeypatch.setattr(local_storage, "exists", lambda key: False if key.endswith("plan.json") else exists(key))
    assert load_or_create_plan(local_storage, 2, "g", lambda: guessed) == plan
    # the plan in use is untouched: a pod that already read shard 0 and one that reads shard 1
    # now still see each item in exactly one shard
    assert [[it.key for it in shard_items(local_storage, plan, s)] for s in (0, 1)] == in_use
    parts = {i.key.rsplit("/", 2)[1] for i in local_storage.list("plan/download-2-g/") if i.key.endswith("0.json")}
    assert parts == {plan["parts"].rsplit("/", 2)[1]}  # the losing pod's parts are gone


def test_a_plan_made_moments_ago_by_another_pod_is_followed_without_a_warning(storage, caplog):
    load_or_create_plan(storage, 4, "old-sources", lambda: [Item("a", 10)])  # the run before
    in_use = storage.read_bytes(PLAN_KEY)
    # pods starting together after the sources changed: pod A has made the new plan but not
    # yet pointed plan/download.json at it when pod B reads it
    load_or_create_plan(storage, 4, "new-sources", lambda: [Item("a", 12)])
    storage.write_bytes(PLAN_KEY, in_use)
    with caplog.at_level(logging.WARNING, logger="trajflow.plan"):
        plan = load_or_create_plan(storage, 4, "new-sources", lambda: [Item("a", 13)])
    assert plan["generation"] == "new-sources" and json.loads(storage.read_bytes(PLAN_KEY)) == plan
    assert "lists other items" not in caplog.text


def test_concurrent_pods_agree_on_one_plan(storage):
    plans: list[dict] = []
    start = threading.Barrier(6)

    def pod(i: int) -> None:
        # each pod sees a different listing, as if the source changed while they started
        items = [Item(f"k{j}", 1 + (j * (i + 1)) % 13) for j in range(20 + i)]
        start.wait()
        plans.append(load_or_create_plan(storage, 4, "g", lambda: items))

    threads = [threading.Thread(target=pod, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(plans) == 6 and all(p == plans[0] for p in plans)


def test_one_pod_lists_the_sources_while_the_others_wait_for_its_plan(storage):
    """Hundreds of pods each listing a million objects (or sending a HEAD to every URL) get
    throttled: only the pod holding the planning lease lists."""
    listings: list[int] = []
    plans: list[dict] = []
    start = threading.Barrier(8)

    def listing() -> list[Item]:
        listings.append(1)
        time.sleep(0.5)  # long enough for every other pod to look for the plan meanwhile
        return [Item(f"k{j}", 1 + j) for j in range(30)]

    def pod() -> None:
        start.wait()
        plans.append(load_or_create_plan(storage, 4, "g", listing))

    threads = [threading.Thread(target=pod) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(listings) == 1 and len(plans) == 8 and all(p == plans[0] for p in plans)


def test_a_planner_that_keeps_renewing_is_waited_for(local_storage, monkeypatch):
    import trajflow.plan as plan_module

    # a beat is a write with fsync: the staleness leaves room for a slow disk's stalls
    monkeypatch.setattr(plan_module, "_LEASE_BEAT_S", 0.05)
    monkeypatch.setattr(plan_module, "_LEASE_STALE_S", 1.5)
    monkeypatch.setattr(plan_module, "_WAIT_POLL_S", (0.05, 0.1))
    listings: list[str] = []
    holding = threading.Event()

    def slow_listing() -> list[Item]:
        listings.append("slow")
        holding.set()
        time.sleep(3.5)  # over twice the staleness: only the beats keep the lease
        return [Item("a", 1)]

    planner = threading.Thread(target=lambda: load_or_create_plan(local_storage, 2, "g", slow_listing))
    planner.start()
    assert holding.wait(10)
    waited = load_or_create_plan(local_storage, 2, "g", lambda: listings.append("waiter") or [Item("b", 2)])
    planner.join()
    assert listings == ["slow"] and waited["items"] == 1


def test_a_planner_that_stopped_renewing_is_taken_over(storage, caplog):
    """A pod killed while listing leaves its lease behind: once stale, the next pod plans."""
    storage.write_bytes("plan/download-2-g/planning/1.json",
                        json.dumps({"holder": "downloader-0-x (pid 7)", "beat": time.time() - 1000, "released": False}).encode())
    with caplog.at_level(logging.WARNING, logger="trajflow.plan"):
        plan = load_or_create_plan(storage, 2, "g", lambda: [Item("a", 1)])
    assert plan["items"] == 1
    assert "downloader-0-x (pid 7) stopped renewing its lease to plan plan/download-2-g; planning here" in caplog.text
    assert storage.exists("plan/download-2-g/planning/2.json")


def test_a_failed_listing_lets_the_next_pod_plan_at_once(local_storage):
    def broken() -> list[Item]:
        raise RuntimeError("source unreachable")

    with pytest.raises(RuntimeError, match="source unreachable"):
        load_or_create_plan(local_storage, 2, "g", broken)
    never = lambda s: pytest.fail(f"waited {s}s for a released lease")  # noqa: E731
    assert load_or_create_plan(local_storage, 2, "g", lambda: [Item("a", 1)], pause=never)["items"] == 1


def test_a_pod_waiting_for_the_planner_stops_when_its_pause_says_so(local_storage):
    """The downloader's pause ends on SIGTERM: a waiting pod stops within its grace period."""
    local_storage.write_bytes("plan/download-2-g/planning/1.json",
                              json.dumps({"holder": "downloader-0-x (pid 7)", "beat": time.time(), "released": False}).encode())
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 3:
            raise InterruptedError("stopping")

    with pytest.raises(InterruptedError):
        load_or_create_plan(local_storage, 2, "g", lambda: pytest.fail("listed while another pod plans"), pause=pause)
    assert pauses == [1.0, 1.5, 2.25]  # backing off between looks


def test_shard_items_range_is_checked(local_storage):
    plan = load_or_create_plan(local_storage, 2, "g", lambda: [Item("a", 1)])
    assert [it.key for it in shard_items(local_storage, plan, 0)] == ["a"] and shard_items(local_storage, plan, 1) == []
    with pytest.raises(ValueError, match="outside the plan's 0..1"):
        shard_items(local_storage, plan, 2)


def test_a_version_1_plan_in_use_still_names_each_shards_items(local_storage):
    # plan/download.json of a run downloaded before the plan had parts
    plan = {"version": 1, "shards": 2, "assignments": [[{"key": "a", "size": 1}], [{"key": "b", "size": 2}]]}
    assert [it.key for it in shard_items(local_storage, plan, 1)] == ["b"]


REMEDY = r"delete plan/download-2-g/ \(or change downloader\.config\.planGeneration\) to plan again"


@pytest.mark.parametrize("stored, problem", [
    (b"{broken", r"corrupt plan \(Expecting"),
    (b"", r"corrupt plan \(Expecting value"),
    (b"[]", r"not a plan of version 2 \(version None\)"),
    (b"null", r"not a plan of version 2 \(version None\)"),
    (b'{"version": 1, "shards": 2, "assignments": [[]]}', r"not a plan of version 2 \(version 1\)"),
    (b'{"version": 2, "shards": 2}', r"corrupt plan \(no 2-shard header\)"),
    (b'{"version": 2, "shards": 3, "parts": "p/", "fingerprint": "f"}', r"corrupt plan \(no 2-shard header\)"),
])
def test_corrupt_stored_plan_is_named_with_the_remedy(local_storage, stored, problem):
    local_storage.write_bytes("plan/download-2-g/plan.json", stored)
    with pytest.raises(ValueError, match=rf"plan/download-2-g/plan\.json: {problem}.*: {REMEDY}"):
        load_or_create_plan(local_storage, 2, "g", lambda: [])


@pytest.mark.parametrize("damage, problem", [
    (None, "part of the plan is missing"),
    (b"{broken", r"corrupt part of the plan \(Expecting"),
    (b'{"fingerprint": "other", "shard": 1, "items": []}', "not shard 1's part of plan"),
    (b'{"shard": 0, "items": []}', "not shard 1's part of plan"),
])
def test_a_damaged_part_of_the_plan_is_named_with_the_remedy(local_storage, damage, problem):
    plan = load_or_create_plan(local_storage, 2, "g", lambda: [Item("a", 1), Item("b", 2)])
    part = f"{plan['parts']}00001.json"
    if damage is None:
        local_storage.delete(part)
    else:
        local_storage.write_bytes(part, damage)
    with pytest.raises(ValueError, match=rf"{part}: {problem}.*: {REMEDY}"):
        shard_items(local_storage, plan, 1)
    assert [it.key for it in shard_items(local_storage, plan, 0)] == ["b"]  # the other parts still serve


def test_a_plan_written_as_its_lease_is_released_is_not_listed_again(local_storage):
    """A pod that found no plan, then the lease released, looks for the plan once more after
    taking the next term: the planner writes its plan before it releases."""
    import trajflow.plan as plan_module

    directory = "plan/download-2-g"
    local_storage.write_bytes(f"{directory}/planning/1.json", plan_module._PlanningLease.document("other"))
    items = [Item("s/a", 10), Item("s/b", 20)]
    header, parts = plan_document(items, 2, "g")
    plan_module._write_parts(local_storage, directory, header, parts)
    real_list = local_storage.list

    def list_as_the_other_pod_finishes(prefix: str = ""):  # type: ignore[no-untyped-def]
        # between this pod's look for the plan and its look at the lease: plan, then release
        if prefix.endswith("planning/") and not local_storage.exists(f"{directory}/plan.json"):
            local_storage.write_if_absent(f"{directory}/plan.json", plan_module._encode(header))
            local_storage.write_bytes(f"{directory}/planning/1.json",
                                      plan_module._PlanningLease.document("other", released=True))
        return real_list(prefix)

    local_storage.list = list_as_the_other_pod_finishes
    plan = load_or_create_plan(local_storage, 2, "g", lambda: pytest.fail("listed the sources again"),
                               pause=lambda s: None)
    assert plan["fingerprint"] == header["fingerprint"]
    lease = json.loads(local_storage.read_bytes(f"{directory}/planning/2.json"))
    assert lease["released"] is True  # the term it took is handed back at once
