"""The Keras-style batch stream: epochs of fixed steps, passes, DDP slicing, resume."""

from __future__ import annotations

from lightning_vgg.data.sampler import KerasBatchSampler


def batches(s: KerasBatchSampler, epoch: int) -> list[list[tuple[int, int]]]:
    s.set_epoch(epoch)
    return list(s)


def test_steps_walk_an_endless_stream_of_passes() -> None:
    s = KerasBatchSampler(n=10, batch_size=4, steps=5, seed=3)
    assert len(s) == 5
    e0, e1 = batches(s, 0), batches(s, 1)
    # each pass is ceil(10/4)=3 batches, the last one short, as Keras does
    assert [len(b) for b in e0] == [4, 4, 2, 4, 4]
    assert [len(b) for b in e1] == [2, 4, 4, 2, 4]
    first_pass = [i for b in e0[:3] for i, _ in b]
    assert sorted(first_pass) == list(range(10))
    keys = [k for b in e0 + e1 for _, k in b]
    assert len(keys) == len(set(keys)), "every draw has its own key"


def test_six_images_repeat_every_step_like_the_control() -> None:
    s = KerasBatchSampler(n=6, batch_size=20, steps=80, seed=0)
    e = batches(s, 0)
    assert len(e) == 80 and all(sorted(i for i, _ in b) == list(range(6)) for b in e)


def test_epochs_are_reproducible_for_exact_resume() -> None:
    a = KerasBatchSampler(n=50, batch_size=8, steps=7, seed=5)
    b = KerasBatchSampler(n=50, batch_size=8, steps=7, seed=5)
    assert batches(a, 0) != batches(a, 3)
    assert batches(a, 3) == batches(b, 3)  # a fresh sampler jumps straight to epoch 3


def test_ranks_split_the_same_global_batch() -> None:
    full = batches(KerasBatchSampler(n=30, batch_size=6, steps=4, seed=1), 2)
    r0 = batches(KerasBatchSampler(n=30, batch_size=6, steps=4, seed=1, num_replicas=2, rank=0), 2)
    r1 = batches(KerasBatchSampler(n=30, batch_size=6, steps=4, seed=1, num_replicas=2, rank=1), 2)
    for g, a, b in zip(full, r0, r1, strict=True):
        assert sorted(a + b) == sorted(g) and not set(a) & set(b)


def test_no_shuffle_full_pass_is_file_order() -> None:
    s = KerasBatchSampler(n=7, batch_size=3, steps=None, shuffle=False)
    assert [[i for i, _ in b] for b in batches(s, 0)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_stop_ends_the_stream_after_one_pass_like_tf_keras_2() -> None:
    """The seed's control: 6 images, batch 20, 80 steps: tf.keras 2.x trained one step."""
    s = KerasBatchSampler(n=6, batch_size=20, steps=80, seed=0, exhausted="stop")
    assert len(s) == 1 and s.is_exhausted()  # epoch 0 uses up the one pass
    e0 = batches(s, 0)
    assert len(e0) == 1 and sorted(i for i, _ in e0[0]) == list(range(6))
    assert s.is_exhausted()
    assert batches(s, 1) == [] and len(s) == 0


def test_stop_cuts_the_epoch_where_the_pass_ends() -> None:
    s = KerasBatchSampler(n=10, batch_size=4, steps=2, seed=3, exhausted="stop")
    r = KerasBatchSampler(n=10, batch_size=4, steps=2, seed=3)
    assert batches(s, 0) == batches(r, 0) and not s.is_exhausted()
    # the pass holds 3 batches: epoch 1 gets its first (position 2) only
    assert batches(s, 1) == batches(r, 1)[:1] and s.is_exhausted()
    assert not r.is_exhausted()
