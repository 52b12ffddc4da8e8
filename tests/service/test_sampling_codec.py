"""The numpy pieces on their own: seeded draws, pixel conversions, tensor decoding."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service import codec, sampling
from service.errors import InvalidArgument
from service.images import images_from_png, images_from_tensor, images_into
from service.proto.vae.v1 import vae_pb2
from vae_client.client import to_tensor

SEEDS = st.integers(0, 2**64 - 1)
probabilities = hnp.arrays(
    np.float32, st.tuples(st.integers(1, 4), st.just(784)), elements=st.floats(0, 1, width=32)
)


@settings(max_examples=50, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 50), k=st.integers(1, 50), temperature=st.floats(0.1, 3))
def test_prior_latents_depend_on_seed_and_row_only(
    seed: int, n: int, k: int, temperature: float
) -> None:
    big = sampling.prior_latents(max(n, k), 8, seed, temperature)
    small = sampling.prior_latents(min(n, k), 8, seed, temperature)
    np.testing.assert_array_equal(big[: min(n, k)], small)
    assert big.dtype == np.float32


def test_streams_are_independent() -> None:
    z = sampling.prior_latents(1, 784, 7, 1.0)
    eps = sampling.posterior_samples(
        np.zeros((1, 784), np.float32), np.zeros((1, 784), np.float32), 1, 7
    )
    assert abs(np.corrcoef(z[0], eps[0, 0])[0, 1]) < 0.15


def test_draws_do_not_depend_on_the_thread_or_on_draws_before() -> None:
    """Each thread re-seeds one bit generator per draw: neither another purpose's draw in
    between nor another thread may change what a seed gives."""
    p = np.full((2, 784), 0.5, np.float32)
    first = sampling.prior_latents(3, 8, 11, 1.0)
    sampling.bernoulli(p, 11)
    sampling.prior_latents(5, 8, 12, 1.0)
    np.testing.assert_array_equal(sampling.prior_latents(3, 8, 11, 1.0), first)
    with ThreadPoolExecutor(2) as pool:
        in_threads = list(pool.map(lambda _: sampling.prior_latents(3, 8, 11, 1.0), range(8)))
    for z in in_threads:
        np.testing.assert_array_equal(z, first)
    assert not np.array_equal(sampling.prior_latents(3, 8, 12, 1.0)[:3], first)
    assert abs(first.mean()) < 1.5 and 0.3 < first.std() < 2.0  # standard normal draws


@settings(max_examples=50, deadline=None)
@given(p=probabilities)
def test_to_uint8_rounds_255p(p: np.ndarray) -> None:
    grey = sampling.to_uint8(p)
    assert grey.dtype == np.uint8 and grey.shape == p.shape
    assert np.abs(grey - 255 * p.astype(np.float64)).max() <= 0.5 + 1e-4


@settings(max_examples=30, deadline=None)
@given(p=probabilities, seed=SEEDS)
def test_bernoulli_draws_are_seeded_binary(p: np.ndarray, seed: int) -> None:
    draws = sampling.bernoulli(p, seed)
    assert draws.dtype == np.uint8 and set(np.unique(draws)) <= {0, 1}
    np.testing.assert_array_equal(draws, sampling.bernoulli(p, seed))
    assert np.all(draws[p == 0] == 0) and np.all(draws[p == 1] == 1)


def test_sigmoid_in_place_is_exact_and_quiet_at_the_extremes() -> None:
    logits = np.array([[-1000, -90, -5, 0, 5, 90, 1000]], np.float32)
    with np.errstate(over="ignore"):  # the reference may overflow to 1 / inf = 0, rightly
        expected = 1 / (1 + np.exp(-logits.astype(np.float64)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sampling.sigmoid_(logits)
    assert out is logits
    np.testing.assert_allclose(out, expected, atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(images=hnp.arrays(np.uint8, st.tuples(st.integers(1, 5), st.just(28), st.just(28))))
def test_image_tensors_decode_to_unit_floats(images: np.ndarray) -> None:
    as_uint8 = images_from_tensor(to_tensor(images), "images.tensor", limit=10)
    as_float = images_from_tensor(
        to_tensor(images.reshape(-1, 784).astype(np.float32) / 255), "images.tensor", limit=10
    )
    assert as_uint8.shape == (len(images), 784) and as_uint8.dtype == np.float32
    np.testing.assert_allclose(as_uint8, as_float, atol=1e-7)


def test_float_image_tensor_is_a_view_not_a_copy() -> None:
    tensor = to_tensor(np.full((3, 784), 0.25, np.float32))
    images = images_from_tensor(tensor, "images.tensor", limit=10)
    assert not images.flags.owndata and not images.flags.writeable  # a view on the bytes


def test_png_output_round_trips() -> None:
    p = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    output = vae_pb2.ImageOutput()
    images_into(output, p, vae_pb2.IMAGE_FORMAT_PNG, seed=0)
    decoded = images_from_png(list(output.png), "png", limit=10)
    np.testing.assert_allclose(decoded * 255, sampling.to_uint8(p), atol=1e-3)


def test_invalid_argument_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        codec.count_in(0, "count", limit=5)
    assert info.value.field == "count" and str(info.value) == "count: expected 1 to 5, got 0"
