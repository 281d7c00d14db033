import math

import pytest
import torch
from sklearn.datasets import load_digits

from lightning_eos.data import DigitsDataModule

NUM_EXAMPLES = 1797


def make_datamodule(**kwargs) -> DigitsDataModule:
    datamodule = DigitsDataModule(**kwargs)
    datamodule.setup("fit")
    return datamodule


def only_batch(loader):
    batches = list(loader)
    assert len(batches) == 1
    return batches[0]


@pytest.fixture(scope="module")
def held_out():
    return make_datamodule(test_fraction=0.2, targets="labels")


SHAPE_CASES = {
    "flat-one-hot": ({}, (64,), (10,), torch.float32),
    "flat-labels": ({"targets": "labels"}, (64,), (), torch.int64),
    "images-one-hot": ({"flatten": False}, (1, 8, 8), (10,), torch.float32),
}


@pytest.mark.parametrize(
    ("kwargs", "input_shape", "target_shape", "target_dtype"),
    SHAPE_CASES.values(),
    ids=SHAPE_CASES,
)
def test_batch_shapes_and_dtypes(kwargs, input_shape, target_shape, target_dtype):
    inputs, targets = only_batch(make_datamodule(**kwargs).train_dataloader())

    assert inputs.shape == (NUM_EXAMPLES, *input_shape)
    assert inputs.dtype == torch.float32
    assert targets.shape == (NUM_EXAMPLES, *target_shape)
    assert targets.dtype == target_dtype


def test_one_hot_targets_encode_the_labels():
    _, one_hot = only_batch(make_datamodule().train_dataloader())
    _, labels = only_batch(make_datamodule(targets="labels").train_dataloader())

    assert torch.equal(one_hot.sum(dim=1), torch.ones(NUM_EXAMPLES))
    assert torch.equal(one_hot.argmax(dim=1), labels)
    assert torch.equal(labels, torch.from_numpy(load_digits().target))


def test_full_batch_default_serves_the_whole_training_split(held_out):
    inputs, targets = only_batch(held_out.train_dataloader())
    assert len(inputs) == NUM_EXAMPLES - math.ceil(0.2 * NUM_EXAMPLES)
    assert torch.equal(inputs, held_out.train_dataset.tensors[0])
    assert torch.equal(targets, held_out.train_dataset.tensors[1])


def test_standardization_uses_training_statistics(held_out):
    inputs, _ = only_batch(held_out.train_dataloader())
    test_inputs, _ = only_batch(held_out.test_dataloader())
    std = inputs.std(dim=0, correction=0)
    constant = held_out.feature_std == 0

    assert constant.any()
    assert torch.isfinite(inputs).all() and torch.isfinite(test_inputs).all()
    torch.testing.assert_close(inputs.mean(dim=0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(std[~constant], torch.ones(64)[~constant])
    assert torch.equal(inputs[:, constant], torch.zeros_like(inputs[:, constant]))
    # The held-out split is not standardized with its own statistics.
    assert test_inputs.mean(dim=0).abs().max() > 1e-2


def test_held_out_split_is_stratified(held_out):
    _, train_labels = only_batch(held_out.train_dataloader())
    _, test_labels = only_batch(held_out.test_dataloader())
    all_counts = torch.bincount(torch.from_numpy(load_digits().target))
    test_counts = torch.bincount(test_labels, minlength=10)

    assert len(test_labels) == math.ceil(0.2 * NUM_EXAMPLES)
    assert len(train_labels) + len(test_labels) == NUM_EXAMPLES
    assert ((test_counts - 0.2 * all_counts).abs() <= 1).all()


def test_validation_and_test_serve_the_held_out_split(held_out):
    val_inputs, val_targets = only_batch(held_out.val_dataloader())
    test_inputs, test_targets = only_batch(held_out.test_dataloader())
    assert torch.equal(val_inputs, test_inputs)
    assert torch.equal(val_targets, test_targets)


def test_split_depends_only_on_seed(held_out):
    again = make_datamodule(test_fraction=0.2, targets="labels")
    other = make_datamodule(test_fraction=0.2, targets="labels", seed=1)
    reference = held_out.test_dataset.tensors[0]

    assert torch.equal(again.test_dataset.tensors[0], reference)
    assert not torch.equal(other.test_dataset.tensors[0], reference)


def test_setup_twice_keeps_the_split(held_out):
    dataset = held_out.train_dataset
    held_out.setup("test")
    assert held_out.train_dataset is dataset


def minibatch_labels(seed: int, shuffle: bool = True) -> list[torch.Tensor]:
    datamodule = make_datamodule(
        batch_size=500, targets="labels", seed=seed, shuffle=shuffle
    )
    return [labels for _, labels in datamodule.train_dataloader()]


def test_minibatches_cover_the_split_in_seeded_order():
    batches = minibatch_labels(seed=0)
    all_labels = torch.from_numpy(load_digits().target)

    assert [len(labels) for labels in batches] == [500, 500, 500, 297]
    assert torch.equal(torch.cat(batches).sort().values, all_labels.sort().values)
    assert not torch.equal(torch.cat(batches), all_labels)
    assert all(map(torch.equal, batches, minibatch_labels(seed=0)))
    assert not torch.equal(batches[0], minibatch_labels(seed=1)[0])
    assert torch.equal(torch.cat(minibatch_labels(0, shuffle=False)), all_labels)


def test_collate_also_stacks_single_samples(held_out):
    """Code that picks examples by index collates ``dataset[i]`` with the loader's."""
    loader = held_out.train_dataloader()
    samples = [loader.dataset[i] for i in (5, 0, 7)]
    inputs, labels = loader.collate_fn(samples)

    assert torch.equal(inputs, held_out.train_dataset.tensors[0][[5, 0, 7]])
    assert torch.equal(labels, held_out.train_dataset.tensors[1][[5, 0, 7]])


def test_without_held_out_split():
    datamodule = make_datamodule()
    assert datamodule.val_dataloader() == []
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\); got 0"):
        datamodule.test_dataloader()


def test_loaders_need_setup():
    with pytest.raises(RuntimeError, match=r"setup\(\) before train_dataloader"):
        DigitsDataModule().train_dataloader()


def test_class_attributes():
    assert DigitsDataModule.num_classes == 10
    assert DigitsDataModule.input_dim == 64


SEED = r"must be an integer in \[0, 4294967295\]"
BAD_ARGUMENTS = {
    "batch_size-zero": ({"batch_size": 0}, r"`batch_size` must be .*got 0"),
    "batch_size-float": ({"batch_size": 2.5}, r"`batch_size` must be .*got 2\.5"),
    "batch_size-bool": ({"batch_size": True}, r"`batch_size` must be .*got True"),
    "test_fraction-negative": ({"test_fraction": -0.1}, r"`test_fraction` .*got -0\.1"),
    "test_fraction-one": ({"test_fraction": 1.0}, r"`test_fraction` .*\[0, 1\).*1\.0"),
    "targets-unknown": ({"targets": "onehot"}, r"`targets` must be one of .*'onehot'"),
    "targets-list": ({"targets": ["labels"]}, r"`targets` .*got \['labels'\]"),
    "seed-float": ({"seed": 0.5}, rf"`seed` {SEED}, got 0\.5"),
    "seed-negative": ({"seed": -1}, rf"`seed` {SEED}, got -1"),
    "seed-too-large": ({"seed": 2**32}, rf"`seed` {SEED}, got 4294967296"),
    "seed-none": ({"seed": None}, rf"`seed` {SEED}, got None"),
    "shuffle-str": ({"shuffle": "yes"}, r"`shuffle` must be True or False, got 'yes'"),
    "shuffle-int": ({"shuffle": 1}, r"`shuffle` must be True or False, got 1"),
    "flatten-none": ({"flatten": None}, r"`flatten` must be True or False, got None"),
    "num_workers-negative": ({"num_workers": -1}, r"`num_workers` must be .*got -1"),
}


@pytest.mark.parametrize(("kwargs", "match"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_the_largest_seed_is_accepted_by_the_split():
    datamodule = DigitsDataModule(batch_size=64, test_fraction=0.2, seed=2**32 - 1)
    datamodule.setup("fit")
    inputs, _ = next(iter(datamodule.train_dataloader()))
    assert inputs.shape == (64, 64)


BAD_SETUPS = {
    "batch_size-above-split": (
        {"batch_size": 1500, "test_fraction": 0.2},
        r"batch_size must not exceed the 1437 training examples; got 1500",
    ),
    "held-out-too-small": ({"test_fraction": 0.004}, r"test_fraction=0\.004 leaves 8"),
    "training-too-small": ({"test_fraction": 0.996}, r"test_fraction=0\.996 leaves"),
}


@pytest.mark.parametrize(("kwargs", "match"), BAD_SETUPS.values(), ids=BAD_SETUPS)
def test_bad_splits_raise_in_setup(kwargs, match):
    datamodule = DigitsDataModule(**kwargs)
    with pytest.raises(ValueError, match=match):
        datamodule.setup("fit")
