"""Checks of IMAGE tensors before the forward pass, free of Triton.

Two kinds: what needs no pixel (element type, shape, the size limits of the model's
config) and what needs one minimum and one maximum per sample (NaN or Inf, the float32
range, ``pixel_range``). :meth:`ImageChecks.screen` runs the second kind once over the
images of a whole batch, because the dynamic batcher sends many one-image requests; a
request's own message is worked out only when one of its samples fails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gradtrust.errors import InvalidInputError
from gradtrust.serving.decoding import spatial_size
from gradtrust.serving.settings import ModelSettings

_FLOAT32 = np.dtype(np.float32)


class ImageChecks:
    """What a model accepts as IMAGE, from its settings and its input shape."""

    def __init__(
        self, settings: ModelSettings, input_shape: Sequence[int | str | None], layout: str
    ) -> None:
        self.settings = settings
        self.input_shape = tuple(input_shape)
        self.layout = layout  # NCHW or NHWC: where height and width are
        # The IMAGE dims the model fixes (batch axis excluded), checked for every request.
        self._rank = len(self.input_shape) + 1
        self._fixed_dims = tuple(
            (axis, size)
            for axis, size in enumerate(self.input_shape, start=1)
            if isinstance(size, int)
        )
        # A model with every IMAGE dim fixed accepts one shape per image: a request of that
        # shape passes every check of check_layout but the dtype and the byte limit, which
        # check_layout then tests first (the exact checks run on anything else).
        exact = (
            tuple(size for _, size in self._fixed_dims)
            if len(self._fixed_dims) == len(self.input_shape)
            else None
        )
        if exact is not None and len(exact) == 3:
            height, width = spatial_size((1, *exact), layout)
            if height * width > settings.max_image_pixels:
                exact = None  # every request fails: let the exact checks say why
        self._exact_shape = exact
        lo, hi = settings.pixel_min, settings.pixel_max
        # pixel_range [0, hi] with hi a float32 value (the usual "0,1"): float32 batches can
        # be cleared in one pass over their bits (see _cleared_in_one_pass).
        self._bits_bound: int | None = (
            int(np.array(hi, dtype=np.float32).view(np.uint32))
            if lo == 0.0
            and hi is not None
            and 0.0 < hi < float(np.finfo(np.float32).max)
            and float(np.float32(hi)) == hi
            else None
        )
        # The pixel_range check's bounds and message, formatted once rather than per batch.
        self._range: tuple[float, float, str] | None = (
            None
            if lo is None or hi is None
            else (
                lo,
                hi,
                f"IMAGE pixels outside [{lo:g}, {hi:g}] in sample(s) {{}}: scale pixels "
                f"to [{lo:g}, {hi:g}] (e.g. divide 8-bit values by 255)",
            )
        )

    def check_request_size(self, shape: Sequence[int], itemsize: int) -> None:
        """Reject an oversized IMAGE from its shape alone, before any pixel is read.

        Triton has already capped the batch at max_batch_size and checked the dims it
        knows; this bounds the bytes of one request and the pixels of one image, which
        matters for variable-size inputs (config parameters max_request_bytes and
        max_image_pixels).
        """
        dims = [int(d) for d in shape]
        if any(d < 0 for d in dims):
            raise InvalidInputError(f"IMAGE has a negative dimension in its shape {dims}")
        nbytes = math.prod(dims) * int(itemsize)  # Python ints: absurd dims cannot overflow
        limit = self.settings.max_request_bytes
        if nbytes > limit:
            raise InvalidInputError(
                f"IMAGE of shape {dims} holds {nbytes} bytes, over this model's limit of "
                f"{limit} bytes per request (config parameter max_request_bytes): "
                "send fewer or smaller images per request"
            )
        if len(dims) == 4:
            height, width = spatial_size(dims, self.layout)
            if height * width > self.settings.max_image_pixels:
                raise InvalidInputError(
                    f"IMAGE images are {height}x{width} = {height * width} pixels, over this "
                    f"model's limit of {self.settings.max_image_pixels} (config parameter "
                    "max_image_pixels): downscale them"
                )

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """Reject what the forward pass must not see; Triton has already checked shape and dtype."""
        self.check_layout(images)
        low, high = extremes(images)
        problem = self._pixel_problem(low, high, images.dtype)
        if problem is not None:
            raise problem
        return images

    def check_layout(self, images: np.ndarray) -> None:
        """Element type, size and shape: everything that needs no pixel read."""
        shape = getattr(images, "shape", None)
        if (
            shape is not None
            and shape[1:] == self._exact_shape
            and isinstance(images, np.ndarray)
            and images.dtype.kind in "fiu"
            and 0 < images.nbytes <= self.settings.max_request_bytes
        ):
            return  # the usual request: the model's own shape, within the byte limit
        if not isinstance(images, np.ndarray) or images.dtype.kind not in "fiu":
            kind = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise InvalidInputError(f"IMAGE has element type {kind}; send real-valued pixels")
        shape = images.shape
        self.check_request_size(shape, images.dtype.itemsize)
        if len(shape) != self._rank or any(shape[axis] != size for axis, size in self._fixed_dims):
            expected = self.input_shape
            raise InvalidInputError(
                f"IMAGE has shape {list(shape)}; expected [batch, {', '.join(map(str, expected))}]"
            )
        if shape[0] == 0:
            raise InvalidInputError("IMAGE holds an empty batch: send at least one image")

    def _pixel_checks(
        self, low: np.ndarray, high: np.ndarray, dtype: np.dtype
    ) -> list[tuple[np.ndarray, str]]:
        """Per-sample masks, in the order they are reported, from each sample's min and max
        pixel (min/max propagate NaN; +-inf shows up as a non-finite extreme), each with its
        message ({} = the failing samples)."""
        checks = [
            (
                ~(np.isfinite(low) & np.isfinite(high)),
                "IMAGE has NaN or Inf pixels in sample(s) {}: send finite pixel values",
            )
        ]
        if dtype.kind == "f" and dtype.itemsize > 4:
            big = float(np.finfo(np.float32).max)
            checks.append(
                (
                    (low < -big) | (high > big),
                    "IMAGE pixels in sample(s) {} exceed the float32 range the model computes "
                    "in: send finite FP32 pixel values",
                )
            )
        if self._range is not None:
            lo, hi, message = self._range
            checks.append(((low < lo) | (high > hi), message))
        return checks

    def _cleared_in_one_pass(self, images: np.ndarray) -> bool:
        """True only when every pixel passes every check, decided with one reduction
        instead of two (min and max); False means "run the exact checks".

        For float32 pixels and pixel_range [0, hi]: read as unsigned 32-bit integers,
        +0.0 ... hi are exactly the bit patterns 0 ... bits(hi), in the same order, while
        every negative value (-0.0 included), NaN and infinity lies above bits(hi). So
        ``max(bits) <= bits(hi)`` means every pixel is finite and inside [0, hi]. -0.0
        passes the exact checks but not this one: such a batch takes the exact path.
        """
        # (A non-native float32 differs from _FLOAT32; reshape copies a non-contiguous batch.)
        if self._bits_bound is None or images.dtype != _FLOAT32 or images.size == 0:
            return False
        return int(np.maximum.reduce(images.reshape(-1).view(np.uint32))) <= self._bits_bound

    def _pixel_problem(
        self, low: np.ndarray, high: np.ndarray, dtype: np.dtype
    ) -> InvalidInputError | None:
        """The first thing wrong with one request's pixels, if anything."""
        for mask, message in self._pixel_checks(low, high, dtype):
            if mask.any():
                return InvalidInputError(message.format(np.flatnonzero(mask).tolist()))
        return None

    def screen(
        self, parts: list[np.ndarray]
    ) -> tuple[list[InvalidInputError | None], np.ndarray | None]:
        """The pixel problem of each request's images (None where there is none), checked
        in one pass over the batch, and all images joined in one array when they share a
        shape (None for variable-size inputs). Each part must have passed
        :meth:`check_layout`."""
        images: np.ndarray | None = None
        if len(parts) == 1 or all(p.shape[1:] == parts[0].shape[1:] for p in parts):
            images = join_images(parts)
            if self._cleared_in_one_pass(images):
                return [None] * len(parts), images
            low, high = extremes(images)
        else:  # variable-size inputs: one array cannot hold them all
            pairs = [extremes(p) for p in parts]
            low = np.concatenate([pair[0] for pair in pairs])
            high = np.concatenate([pair[1] for pair in pairs])
        # The batch's dtype holds every request's values: its checks cover them all.
        checks = self._pixel_checks(low, high, low.dtype)
        rejected = checks[0][0]
        for mask, _ in checks[1:]:
            rejected = rejected | mask
        problems: list[InvalidInputError | None] = [None] * len(parts)
        if rejected.any():
            start = 0
            for n, part in enumerate(parts):
                stop = start + len(part)
                if rejected[start:stop].any():
                    problems[n] = self._pixel_problem(low[start:stop], high[start:stop], part.dtype)
                start = stop
        return problems, images


def join_images(parts: list[np.ndarray]) -> np.ndarray:
    """One array of all images; a lone request's own array is used as is (no copy)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def extremes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's smallest and largest pixel: two reductions instead of isfinite and two
    comparisons over every pixel."""
    flat = images.reshape(images.shape[0], -1)
    return flat.min(axis=1), flat.max(axis=1)
