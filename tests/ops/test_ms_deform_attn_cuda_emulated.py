"""The CUDA kernels of csrc/cuda/ms_deform_attn_cuda.cu, run on the CPU by the
emulator in tests/ops/cuda_emulation (no GPU needed; see msda_emu.h for what is
and is not emulated), against the float64 reference.

Every tensor the kernels touch sits inside a larger buffer fenced by
inaccessible pages (cuda_emulation.Guarded): the margins of inputs hold NaN (a
read out of bounds poisons the result) and inputs must stay bitwise
unchanged; the margins of outputs hold a sentinel that must survive, and
outputs start as NaN (every element must be written) except grad_value, which
starts zeroed under the float-atomic strategies (they add into it). Each
comparison runs every grad_value strategy. Replay a failure with the printed
MSDA_TEST_SEED (it also seeds the emulated block and thread order).
"""
import ctypes
import weakref

import pytest
import torch

from tests.ops.cuda_emulation import ATOMIC, DETERMINISTIC, SHARED, STRATEGIES, EmulatedLaunchError, EmulatorUnavailable, \
    Guarded, load_emulator, pointer
from detr_cuda.ops.reference import ms_deform_attn_reference
from tests.support.msda_inputs import FOUR_LEVELS, ONE_LEVEL, TOLERANCES, fresh_generator, level_geometry, make_inputs, \
    max_abs_error_ratio

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SENTINEL = -1234.5


@pytest.fixture(scope="module")
def emu():
    try:
        emulator = load_emulator()
    except EmulatorUnavailable as error:
        pytest.skip(str(error))
    emulator.take_launch_log()
    return emulator


def acc_dtype(dtype):
    """Locations, attention and every gradient but grad_value's final cast: float64 for float64 value."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def guarded_input(tensor, shift=0):
    return Guarded(tensor.shape, tensor.dtype, float("nan"), init=tensor, shift=shift)


def strategies(emu):
    """The backward's grad_value strategies: global atomics, shared-memory aggregation, deterministic."""
    return list(STRATEGIES)


def run_emulated(emu, value, spatial_shapes, level_start_index, locations, attention, grad_output,
                 value_shift=0, output_shift=0, grad_output_shift=0, grad_value_shift=0, strategy=ATOMIC):
    """Forward and backward through the emulated kernels, checking every guard.

    Returns (output, grad_value (accumulation dtype), grad_locations, grad_attention).
    """
    dtype, acc = value.dtype, locations.dtype
    batch, _, heads, channels = value.shape
    queries = locations.shape[1]
    inputs = {
        "value": guarded_input(value, value_shift),
        "sampling_locations": guarded_input(locations),
        "attention_weights": guarded_input(attention),
        "grad_output": guarded_input(grad_output, grad_output_shift),
    }
    output = Guarded((batch, queries, heads * channels), dtype, SENTINEL, interior=float("nan"), shift=output_shift)
    emu.forward(inputs["value"].tensor, spatial_shapes, level_start_index, inputs["sampling_locations"].tensor,
                inputs["attention_weights"].tensor, output.tensor)
    grads = {
        # Zeroed, as the float-atomic strategies need; NaN for the deterministic one, which
        # the glue leaves uninitialised because its conversion writes every element.
        "grad_value": Guarded(value.shape, acc, SENTINEL, interior=float("nan") if strategy == DETERMINISTIC else 0.0,
                              shift=grad_value_shift),
        "grad_locations": Guarded(locations.shape, acc, SENTINEL, interior=float("nan")),
        "grad_attention": Guarded(attention.shape, acc, SENTINEL, interior=float("nan")),
    }
    # The deterministic strategy's fixed-point sums and bounds (zeroed int64).
    workspace = Guarded((value.numel() + 2,), torch.int64, -12345, interior=0)
    emu.backward(inputs["grad_output"].tensor, inputs["value"].tensor, spatial_shapes, level_start_index,
                 inputs["sampling_locations"].tensor, inputs["attention_weights"].tensor,
                 grads["grad_value"].tensor, grads["grad_locations"].tensor, grads["grad_attention"].tensor,
                 strategy=strategy, workspace=workspace.tensor if strategy == DETERMINISTIC else None)
    assert workspace.margins_unchanged(), "the kernels wrote past the ends of the deterministic workspace"
    for name, guarded in inputs.items():
        assert guarded.unchanged(), f"the kernels wrote into {name} or its margins"
    for name, guarded in {"output": output, **grads}.items():
        assert guarded.margins_unchanged(), f"the kernels wrote past the ends of {name}"
    return (output.tensor.clone(), grads["grad_value"].tensor.clone(), grads["grad_locations"].tensor.clone(),
            grads["grad_attention"].tensor.clone())


def reference(value, spatial_shapes, level_start_index, locations, attention, grad_output):
    """(output, grad_value, grad_locations, grad_attention) in float64 by autograd."""
    leaves = [t.detach().double().requires_grad_() for t in (value, locations, attention)]
    output = ms_deform_attn_reference(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    output.backward(grad_output.double())
    return (output.detach(),) + tuple(leaf.grad for leaf in leaves)


def random_inputs(dtype, shapes, batch, queries, heads, channels, points, generator):
    inputs = make_inputs(shapes, batch, queries, heads, channels, points, dtype=dtype, generator=generator,
                         loc_dtype=acc_dtype(dtype))
    grad_output = torch.randn(batch, queries, heads * channels, generator=generator,
                              dtype=torch.float64).to(dtype)
    return inputs, grad_output


def assert_close_to_reference(actual, expected, dtype, strategy=ATOMIC):
    tolerance = TOLERANCES[dtype]
    for name, got, want in zip(("output", "grad_value", "grad_locations", "grad_attention"), actual, expected):
        where = f"({dtype}, grad_value strategy {strategy})"
        assert torch.isfinite(got).all(), f"{name} has non-finite elements (unwritten, or NaN read) {where}"
        error = max_abs_error_ratio(got, want)
        assert error <= tolerance, f"{name}: max error {error:.3g} x max|ref| > {tolerance:g} {where}"


def new_generator(emu):
    """A fresh input generator; its seed also seeds the emulator's block and thread order."""
    generator = fresh_generator()
    emu.set_seed(generator.initial_seed())
    return generator


def check_case(emu, dtype, shapes, channels, points, batch=2, queries=9, heads=3, **shifts):
    generator = new_generator(emu)
    inputs, grad_output = random_inputs(dtype, shapes, batch, queries, heads, channels, points, generator)
    expected = reference(*inputs, grad_output)
    for strategy in strategies(emu):
        actual = run_emulated(emu, *inputs, grad_output, strategy=strategy, **shifts)
        assert actual[0].dtype == dtype and actual[2].dtype == acc_dtype(dtype)
        assert_close_to_reference(actual, expected, dtype, strategy)
    return emu.take_launch_log()


# Channels per head cover every vector width (16-byte vectors: 4 fp32, 2 fp64,
# 8 fp16/bf16; C not a multiple falls to 2 or 1) and every lane count (1..32,
# and 32 lanes each looping over several vectors for the large C).
LARGE_CHANNELS = {torch.float64: 128, torch.float32: 256, torch.float16: 512, torch.bfloat16: 512}
CASES = [
    # (channels, shapes, points)
    (1, FOUR_LEVELS, 4),
    (3, ONE_LEVEL, 4),
    (8, FOUR_LEVELS, 1),
    (30, FOUR_LEVELS, 2),
    (32, FOUR_LEVELS, 4),
    (64, ONE_LEVEL, 8),
    (71, FOUR_LEVELS, 2),
    ("large", [(2, 3), (1, 4)], 2),
    # P = 8 (the forward's other P template) and an odd P (runtime P; the
    # backward takes one sample at a time).
    (32, FOUR_LEVELS, 8),
    (16, FOUR_LEVELS, 3),
]
BACKWARD_KERNELS = {ATOMIC: "backward_atomic_kernel", SHARED: "backward_shared_kernel",
                    DETERMINISTIC: "backward_atomic_kernel"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels, shapes, points", CASES,
                         ids=[f"C{c}-{len(s)}levels-P{p}" for c, s, p in CASES])
def test_matches_reference(emu, dtype, channels, shapes, points):
    channels = LARGE_CHANNELS[dtype] if channels == "large" else channels
    # Large C: fewer rows (each runs 32 lanes), still more than one block.
    queries = 3 if channels > 100 else 9
    log = check_case(emu, dtype, shapes, channels, points, queries=queries)
    backward = [line for line in log if "backward" in line]
    assert len(backward) == len(strategies(emu)), log
    for strategy, line in zip(strategies(emu), backward):
        assert BACKWARD_KERNELS[strategy] in line, log


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("which", ["value", "output", "grad_output"])
def test_misaligned_buffers_use_narrower_vectors(emu, dtype, which):
    """A buffer one element off 16-byte alignment: the launcher must pick a
    narrower vector (a misaligned vector access is a launch error here, via
    -fsanitize=alignment, as it is on a GPU)."""
    aligned = check_case(emu, dtype, FOUR_LEVELS, 32, 2)
    shifted = check_case(emu, dtype, FOUR_LEVELS, 32, 2, **{f"{which}_shift": 1})
    print("aligned:", aligned, "\nshifted:", shifted)


def test_many_blocks_and_rows(emu):
    """More rows than one block holds, with every category of sample."""
    log = check_case(emu, torch.float32, FOUR_LEVELS, 32, 4, batch=3, queries=40, heads=4)
    assert max(int(line.split("grid=(")[1].split(",")[0]) for line in log) > 1


@pytest.fixture(scope="module")
def small_emu():
    """The same kernels on a small device (2 SMs, 48 KiB of shared memory per
    block at most), so that launchers sizing grids or shared memory from the
    device take their other paths (grid-stride loops, fallbacks)."""
    try:
        emulator = load_emulator(sm_count=2, max_shared_optin_bytes=48 * 1024)
    except EmulatorUnavailable as error:
        pytest.skip(str(error))
    emulator.take_launch_log()
    return emulator


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels, shapes, points", [(32, FOUR_LEVELS, 4), (71, [(16, 24), (8, 12)], 2)],
                         ids=["C32-4levels", "C71-large-maps"])
def test_matches_reference_on_a_small_device(small_emu, dtype, channels, shapes, points):
    # 12 (batch, head) pairs on 2 SMs: persistent blocks loop over several work items.
    check_case(small_emu, dtype, shapes, channels, points, batch=3, queries=24, heads=4)


@pytest.fixture(scope="module")
def sm90_emu():
    """The same kernels built with their sm_90 branch (MSDA_VECTOR_ATOMICS):
    float grad_value contributions go out as float4 / float2 atomicAdds, which
    must be aligned to their size and aimed at global memory (otherwise a
    launch error here, as on a GPU)."""
    try:
        emulator = load_emulator(vector_atomics=True)
    except EmulatorUnavailable as error:
        pytest.skip(str(error))
    emulator.take_launch_log()
    return emulator


# (channels, shapes, points): 16-byte vectors (float4 atomics: C=32), 8-byte
# vectors (float2 atomics: C=30), scalar (C=71), and P=8 on one level.
SM90_CASES = [(32, FOUR_LEVELS, 4), (30, FOUR_LEVELS, 2), (71, FOUR_LEVELS, 2), (64, ONE_LEVEL, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels, shapes, points", SM90_CASES,
                         ids=[f"C{c}-{len(s)}levels-P{p}" for c, s, p in SM90_CASES])
def test_sm90_vector_atomics_match_reference(sm90_emu, dtype, channels, shapes, points):
    sm90_emu.take_vector_atomics()
    check_case(sm90_emu, dtype, shapes, channels, points)
    vector_atomics = sm90_emu.take_vector_atomics()
    # float accumulators with an even C take the vector branch; float64 has none.
    if dtype == torch.float64 or channels % 2:
        assert vector_atomics == 0
    else:
        assert vector_atomics > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which, shift, vector", [("grad_value", 1, False), ("grad_value", 2, True),
                                                  ("value", 1, False), ("value", 2, True), ("grad_output", 1, False)])
def test_sm90_misaligned_buffers_use_narrower_vector_atomics(sm90_emu, dtype, which, shift, vector):
    """A buffer `shift` elements off 16-byte alignment: float2 atomics where
    the pointers still allow 2-channel vectors, scalar ones where not (a
    misaligned float4 / float2 atomicAdd is a launch error)."""
    sm90_emu.take_vector_atomics()
    check_case(sm90_emu, dtype, FOUR_LEVELS, 32, 2, **{f"{which}_shift": shift})
    assert (sm90_emu.take_vector_atomics() > 0) == vector


def test_sm90_emulation_is_a_separate_build(emu, sm90_emu):
    """The portable build never runs a vector atomic (the sm_90 branch is compiled out)."""
    emu.take_vector_atomics()
    check_case(emu, torch.float32, FOUR_LEVELS, 32, 4)
    assert emu.take_vector_atomics() == 0
    assert emu.path != sm90_emu.path


def launch_grid_x(line):
    return int(line.split("grid=(")[1].split(",")[0])


@pytest.mark.parametrize("sm_count, optin, blocks", [
    # pairs = B*H = 6 (batch, head); 64 rows per pass (C=32 fp32: 8 lanes a row), so Q=150 has at
    # most 3 slices. All levels take S*C*4 = 9984 B (+32 B of level table); one 512-thread block
    # per SM (registers).
    (16, 227 * 1024, 12),  # 2 query slices per pair: 12 blocks split each pair's queries
    (40, 227 * 1024, 18),  # at most 3 slices (one 64-query pass each): 18 blocks
    (4, 227 * 1024, 4),    # fewer resident blocks than pairs: 4 blocks loop over 6 items
    (3, 1600, 3),          # 1600 B: levels 3 and 2 (768 B each) in shared memory, levels 1 and 0 global
    (3, 100, 3),           # room for the level table only: every level uses global atomics
])
def test_shared_strategy_grid_and_budget(emu, sm_count, optin, blocks):
    """Persistent blocks split the (batch, head, query slice) items, and the
    levels that fit the shared budget (coarsest first) are aggregated on chip
    while the others use global atomics: the reference's grad_value, and
    output / grad_locations / grad_attention bitwise equal to the atomic
    strategy's."""
    device = load_emulator(sm_count=sm_count, max_shared_optin_bytes=optin)
    shapes = [(6, 7), (4, 6), (3, 2), (2, 3)]  # fp32, C=32: 5376, 3072, 768, 768 bytes per level
    generator = new_generator(device)
    inputs, grad_output = random_inputs(torch.float32, shapes, 2, 150, 3, 32, 4, generator)
    device.take_launch_log()
    shared = run_emulated(device, *inputs, grad_output, strategy=SHARED)
    log = [line for line in device.take_launch_log() if "backward" in line]
    assert len(log) == 1 and "backward_shared_kernel" in log[0] and launch_grid_x(log[0]) == blocks, log
    assert int(log[0].split("shared=")[1]) <= optin
    atomic = run_emulated(device, *inputs, grad_output, strategy=ATOMIC)
    assert_close_to_reference(shared, reference(*inputs, grad_output), torch.float32, SHARED)
    assert torch.equal(shared[0], atomic[0])
    assert torch.equal(shared[2], atomic[2]) and torch.equal(shared[3], atomic[3])
    # grad_value: the same sums in another order (relative to max |grad_value|: elements near
    # zero after cancellation carry the order's rounding too).
    assert max_abs_error_ratio(shared[1], atomic[1]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_a_level_larger_than_the_shared_budget(small_emu, dtype):
    """A fine level far larger than the 48 KiB budget next to small coarse
    ones (the realistic case: only the coarse levels fit on chip)."""
    check_case(small_emu, dtype, [(30, 40), (5, 6), (2, 3)], 16, 4, batch=1, queries=70, heads=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_deterministic_grad_value_does_not_depend_on_the_schedule(emu, dtype):
    """Two different block and thread orders (emulator seeds): the
    deterministic strategy's grad_value is bitwise the same, and so are
    grad_locations / grad_attention under every strategy. The float-atomic
    strategies' grad_value may differ in its last bits (printed, not
    asserted: a GPU's order differs from run to run in the same way)."""
    generator = new_generator(emu)
    inputs, grad_output = random_inputs(dtype, FOUR_LEVELS, 2, 40, 3, 32, 4, generator)
    seed = generator.initial_seed()
    for strategy in strategies(emu):
        runs = []
        for schedule in (seed, seed ^ 0x5DEECE66D):
            emu.set_seed(schedule)
            runs.append(run_emulated(emu, *inputs, grad_output, strategy=strategy))
        difference = (runs[0][1] - runs[1][1]).abs().max().item()
        print(f"strategy {strategy}: grad_value max |run 1 - run 2| = {difference:.3g}")
        assert torch.equal(runs[0][2], runs[1][2]) and torch.equal(runs[0][3], runs[1][3])
        if strategy == DETERMINISTIC:
            assert torch.equal(runs[0][1], runs[1][1])
    assert len([line for line in emu.take_launch_log() if "backward_atomic_kernel" in line]) == 4


@pytest.mark.parametrize("where", ["grad_output", "attention"])
def test_deterministic_grad_value_is_nan_after_a_non_finite_input(emu, where):
    """A NaN in grad_output or an Inf attention weight leaves no finite scale
    for the fixed-point sums: every grad_value element is NaN (never a
    silently wrong finite number)."""
    generator = new_generator(emu)
    (value, spatial_shapes, level_start_index, locations, attention), grad_output = random_inputs(
        torch.float32, ONE_LEVEL, 1, 5, 2, 8, 4, generator)
    if where == "grad_output":
        grad_output[0, 3, 5] = float("nan")
    else:
        attention[0, 2, 1, 0, 3] = float("inf")
    grads = (torch.zeros_like(value), torch.empty_like(locations), torch.empty_like(attention))
    emu.backward(grad_output, value, spatial_shapes, level_start_index, locations, attention, *grads,
                 strategy=DETERMINISTIC)
    assert torch.isnan(grads[0]).all()


@pytest.mark.parametrize("batch, queries", [(0, 5), (2, 0)])
def test_empty_launches_nothing(emu, batch, queries):
    emu.take_launch_log()
    spatial_shapes, level_start_index, num_values = level_geometry(FOUR_LEVELS)
    value = torch.randn(batch, num_values, 2, 8)
    locations = torch.rand(batch, queries, 2, 4, 2, 2)
    attention = torch.rand(batch, queries, 2, 4, 2)
    output = torch.empty(batch, queries, 16)
    emu.forward(value, spatial_shapes, level_start_index, locations, attention, output)
    for strategy in strategies(emu):
        emu.backward(torch.empty(batch, queries, 16), value, spatial_shapes, level_start_index, locations,
                     attention, torch.zeros_like(value), torch.empty_like(locations), torch.empty_like(attention),
                     strategy=strategy)
    assert emu.take_launch_log() == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_untouched_nan_values_do_not_leak(emu, dtype):
    """NaN in value positions that no sample reads (a level sampled only
    outside the map, and extra positions past the last level) must not reach
    the output or any gradient."""
    shapes = [(4, 6), (3, 5)]
    generator = new_generator(emu)
    (value, spatial_shapes, level_start_index, locations, attention), grad_output = random_inputs(
        dtype, shapes, 2, 7, 3, 32, 4, generator)
    locations[:, :, :, 1] = -0.75  # pixel -4.25 on level 1: nothing is read there
    extra = 5
    poisoned = torch.cat([value, torch.zeros_like(value[:, :extra])], 1)
    poisoned[:, 24:] = float("nan")  # level 1 and the extra positions
    clean = value.clone()
    clean[:, 24:] = 0
    expected = reference(clean, spatial_shapes, level_start_index, locations, attention, grad_output)
    expected = expected[:1] + (torch.cat([expected[1], torch.zeros_like(expected[1][:, :extra])], 1),) + expected[2:]
    for strategy in strategies(emu):
        actual = run_emulated(emu, poisoned, spatial_shapes, level_start_index, locations, attention, grad_output,
                              strategy=strategy)
        assert_close_to_reference(actual, expected, dtype, strategy)


@pytest.mark.parametrize("bad_shape, bad_start", [
    ((3, 5), 24),        # reaches 6 positions past S
    ((1, 1000000), 24),  # far wider than S
    ((3, 3), -3),        # starts before the first position
    ((3, 3), 1 << 62),   # starts far past S (an int64 overflow of start + H*W must not wrap into range)
])
def test_inconsistent_level_geometry_stays_in_bounds(emu, bad_shape, bad_start):
    """Level 1's shape or start does not fit value's S (a direct op call skips
    the wrapper's check): the kernels skip that level, reading and writing
    nothing out of bounds, and its sampling gradients are zero."""
    generator = new_generator(emu)
    (value, spatial_shapes, level_start_index, locations, attention), grad_output = random_inputs(
        torch.float32, [(4, 6), (3, 3)], 2, 6, 2, 8, 4, generator)
    bad_shapes = spatial_shapes.clone()
    bad_shapes[1] = torch.tensor(bad_shape)
    bad_starts = level_start_index.clone()
    bad_starts[1] = bad_start
    level0 = (slice(None),) * 3 + (slice(0, 1),)
    expected = reference(value[:, :24], spatial_shapes[:1], level_start_index[:1], locations[level0],
                         attention[level0], grad_output)
    grad_value = torch.cat([expected[1], torch.zeros_like(value[:, 24:], dtype=torch.float64)], 1)
    grad_locations = torch.cat([expected[2], torch.zeros_like(expected[2])], 3)
    grad_attention = torch.cat([expected[3], torch.zeros_like(expected[3])], 3)
    for strategy in strategies(emu):
        actual = run_emulated(emu, value, bad_shapes, bad_starts, locations, attention, grad_output,
                              strategy=strategy)
        assert_close_to_reference(actual, (expected[0], grad_value, grad_locations, grad_attention), torch.float32,
                                  strategy)


def test_unknown_value_type_is_an_error(emu):
    emu.take_launch_log()
    spatial_shapes, level_start_index, num_values = level_geometry(ONE_LEVEL)
    value = torch.randn(1, num_values, 1, 8)
    locations = torch.full((1, 1, 1, 1, 1, 2), 0.5)
    attention = torch.ones(1, 1, 1, 1, 1)
    output = torch.empty(1, 1, 8)
    # 7 is no detr_cuda::ValueType: the launcher answers cudaErrorInvalidValue and launches nothing.
    code = emu.lib.msda_emu_forward(7, *emu.sizes(value, locations), value.data_ptr(), spatial_shapes.data_ptr(),
                                    level_start_index.data_ptr(), locations.data_ptr(), attention.data_ptr(),
                                    output.data_ptr())
    with pytest.raises(EmulatedLaunchError) as error:
        emu.check(code)
    assert error.value.name == "cudaErrorInvalidValue"
    assert emu.take_launch_log() == []


# ----------------------------------------------------------------------------
# The emulator itself: correct kernels give known answers, and every kind of
# undefined behaviour it claims to catch is caught (tests/ops/cuda_emulation/
# msda_emu_selftest.cpp). A checker that cannot fail would prove nothing.

@pytest.fixture(scope="module")
def selftest():
    import os

    from tests.ops.cuda_emulation import HERE, load_library
    try:
        library = load_library("msda_emu_selftest", os.path.join(HERE, "msda_emu_selftest.cpp"))
    except EmulatorUnavailable as error:
        pytest.skip(str(error))
    return library


def expect_error(library, code, name, *fragments):
    with pytest.raises(EmulatedLaunchError) as error:
        library.check(code)
    assert error.value.name == name, str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)
    return str(error.value)


def test_emulated_warp_and_block_semantics(selftest):
    x, y, z = 8, 4, 2
    n = x * y * z
    out = torch.full((n, 8), float("nan"))
    counter = torch.zeros(1, dtype=torch.int32)
    selftest.check(selftest.lib.msda_emu_selftest_semantics(pointer(out), pointer(counter), x, y, z))
    t = torch.arange(n)
    lane = t % 32
    assert torch.equal(out[:, 0], torch.full((n,), 496.0))
    assert torch.equal(out[:, 1], torch.full((n,), 3.0))
    assert torch.equal(out[:, 2], torch.where(lane % 8 == 7, lane, lane + 1).float())
    assert torch.equal(out[:, 3], torch.where(lane % 16 < 2, lane, lane - 2).float())
    assert torch.equal(out[:, 4], torch.ones(n)) and torch.equal(out[:, 5], torch.ones(n))
    assert counter.item() == n
    assert torch.equal(out[:, 6], ((t + 1) % n).float())
    assert torch.equal(out[:, 7], (t % x + 100 * (t // x % y) + 10000 * (t // (x * y))).float())


def test_emulated_partial_last_warp(selftest):
    out = torch.zeros(40, dtype=torch.float64)
    selftest.check(selftest.lib.msda_emu_selftest_partial_warp(pointer(out)))
    assert torch.equal(out, torch.full((40,), 8.0))
    # A whole-warp sum there would read lanes 8..31 of warp 1, which do not exist.
    expect_error(selftest, selftest.lib.msda_emu_selftest_partial_warp_full_sum(pointer(out)), "cudaErrorLaunchFailure",
                 "partial_warp_full_sum_kernel", "which is past the end of the block", "warp 1")


def test_emulated_dynamic_shared_memory_is_poisoned(selftest):
    out = torch.zeros(64)
    selftest.check(selftest.lib.msda_emu_selftest_unwritten_shared(pointer(out), 64))
    assert torch.isnan(out).all()


def test_emulated_missing_barrier_is_exposed(selftest):
    out = torch.zeros(256)
    selftest.check(selftest.lib.msda_emu_selftest_missing_barrier(pointer(out), 256))
    # Threads run in a shuffled order: some read their neighbour's slot before it was written.
    assert torch.isnan(out).any() and (out == 1).any()


def test_emulated_blocks_run_in_shuffled_order(selftest):
    out = torch.full((64,), -1, dtype=torch.int32)
    counter = torch.zeros(1, dtype=torch.int32)
    selftest.check(selftest.lib.msda_emu_selftest_block_order(pointer(out), pointer(counter), 64))
    assert sorted(out.tolist()) == list(range(64)) and out.tolist() != list(range(64))


def test_emulator_catches_divergent_shuffles(selftest):
    out = torch.zeros(128)
    message = expect_error(selftest, selftest.lib.msda_emu_selftest_divergent_shuffle(pointer(out)),
                           "cudaErrorLaunchFailure", "divergent_shuffle_kernel", "deadlock", "__shfl_xor_sync",
                           "__shfl_down_sync")
    print(message)


def test_emulator_catches_a_lane_exited_before_a_full_mask_shuffle(selftest):
    out = torch.zeros(64)
    expect_error(selftest, selftest.lib.msda_emu_selftest_exited_lane_shuffle(pointer(out)), "cudaErrorLaunchFailure",
                 "exited_lane_shuffle_kernel", "lanes 5 exited")


def test_emulator_catches_a_syncthreads_without_partners(selftest):
    out = torch.zeros(64)
    expect_error(selftest, selftest.lib.msda_emu_selftest_lonely_syncthreads(pointer(out)), "cudaErrorLaunchFailure",
                 "different __syncthreads calls", "call site", "threads 1-63")


def test_emulator_catches_syncthreads_against_a_shuffle(selftest):
    out = torch.zeros(32)
    expect_error(selftest, selftest.lib.msda_emu_selftest_syncthreads_vs_shuffle(pointer(out)),
                 "cudaErrorLaunchFailure", "deadlock", "lanes 0-15 wait at __syncthreads",
                 "lanes 16-31 wait at __shfl_xor_sync")


def test_emulator_catches_a_shuffle_from_outside_its_mask(selftest):
    out = torch.zeros(32)
    expect_error(selftest, selftest.lib.msda_emu_selftest_shuffle_outside_mask(pointer(out)), "cudaErrorLaunchFailure",
                 "reads lane 20, which is not in the mask")


def test_emulator_enforces_dynamic_shared_memory_limits(selftest):
    out = torch.zeros(32)
    run = selftest.lib.msda_emu_selftest_shared_size
    selftest.check(run(pointer(out), 48 * 1024, 0))  # the default limit
    expect_error(selftest, run(pointer(out), 64 * 1024, 0), "cudaErrorInvalidValue", "65536 bytes", "shared_kernel",
                 "cudaFuncSetAttribute")
    selftest.check(run(pointer(out), 64 * 1024, 64 * 1024))  # raised for this kernel
    expect_error(selftest, run(pointer(out), 100 * 1024, 64 * 1024), "cudaErrorInvalidValue")
    expect_error(selftest, run(pointer(out), 228 * 1024, 228 * 1024), "cudaErrorInvalidValue", "opt-in maximum")
    selftest.set_device(max_shared_optin_bytes=99 * 1024)  # an A100-like opt-in limit
    try:
        expect_error(selftest, run(pointer(out), 100 * 1024, 100 * 1024), "cudaErrorInvalidValue")
    finally:
        selftest.set_device()
    selftest.check(run(pointer(out), 100 * 1024, 100 * 1024))


def test_emulator_catches_a_shared_memory_overrun(selftest):
    out = torch.zeros(32)
    expect_error(selftest, selftest.lib.msda_emu_selftest_shared_overrun(pointer(out)), "cudaErrorIllegalAddress",
                 "past the end of the dynamic shared memory")


@pytest.mark.parametrize("block, ok", [((1024, 1, 1), True), ((1025, 1, 1), False), ((32, 32, 1), True),
                                       ((16, 16, 8), False), ((1, 1, 65), False), ((0, 1, 1), False)])
def test_emulator_checks_block_sizes(selftest, block, ok):
    out = torch.zeros(1)
    code = selftest.lib.msda_emu_selftest_block_size(pointer(out), *block)
    if ok:
        selftest.check(code)
    else:
        expect_error(selftest, code, "cudaErrorInvalidConfiguration", "invalid block size")


def test_emulator_catches_a_misaligned_vector_load(selftest):
    data = torch.zeros(64)
    out = torch.zeros(32)
    expect_error(selftest, selftest.lib.msda_emu_selftest_misaligned_vector(pointer(data), pointer(out)),
                 "cudaErrorMisalignedAddress", "misaligned_vector_kernel", "16-byte aligned")


def test_emulated_vector_atomics_add_and_count(selftest):
    out = torch.zeros(12)
    selftest.take_vector_atomics()
    selftest.check(selftest.lib.msda_emu_selftest_vector_atomics(pointer(out), 5, 0))
    # 3 blocks of 5 threads: threads 0, 2, 4 take the first vectors, 1, 3 the second.
    expected = torch.tensor([9, 18, 27, 36, 6, 12, 18, 24, 45, 54, 30, 36], dtype=torch.float32)
    assert torch.equal(out, expected), out
    assert selftest.take_vector_atomics() == 2 * 15


@pytest.mark.parametrize("offset, name", [(1, "float4"), (2, "float4")])
def test_emulator_catches_a_misaligned_vector_atomic(selftest, offset, name):
    out = torch.zeros(16)
    expect_error(selftest, selftest.lib.msda_emu_selftest_vector_atomics(pointer(out), 2, offset),
                 "cudaErrorMisalignedAddress", f"{name} atomicAdd", "16-byte alignment", "vector_atomics_kernel")


def test_emulator_catches_a_vector_atomic_on_shared_memory(selftest):
    out = torch.zeros(32)
    expect_error(selftest, selftest.lib.msda_emu_selftest_shared_vector_atomic(pointer(out)), "cudaErrorIllegalAddress",
                 "float4 atomicAdd on shared memory", "shared_vector_atomic_kernel")


def test_emulator_survives_an_illegal_address(selftest):
    out = torch.zeros(32)
    code = selftest.lib.msda_emu_selftest_illegal_address(ctypes.c_void_p(16), pointer(out))
    expect_error(selftest, code, "cudaErrorIllegalAddress", "illegal memory access", "illegal_address_kernel")
    # The next launch works again once the (sticky) fault was reset.
    result = torch.zeros(40, dtype=torch.float64)
    selftest.check(selftest.lib.msda_emu_selftest_partial_warp(pointer(result)))
    assert torch.equal(result, torch.full((40,), 8.0))


def test_a_buffer_passed_only_as_a_pointer_lives_through_the_launch(selftest):
    """pointer(tensor) holds the tensor until the call returns. The
    illegal-address self-test once passed a bare c_void_p(torch.zeros(40,
    dtype=torch.float64).data_ptr()) to its second launch: the zeros were freed
    before the kernel wrote 320 bytes there, over malloc's free-list links, and
    a later test aborted ("malloc(): unsorted double linked list corrupted"),
    which looked like damage from the fault recovery. Here the temporary is a
    Guarded buffer, whose pages are unmapped when it is freed: a write after
    the free would fail the launch (cudaErrorIllegalAddress) instead of
    damaging the heap unseen."""
    held = torch.zeros(40, dtype=torch.float64)
    selftest.check(selftest.lib.msda_emu_selftest_partial_warp(pointer(held)))  # every stack it needs is mapped
    selftest.check(selftest.lib.msda_emu_selftest_partial_warp(pointer(Guarded((40,), torch.float64, 0.0).tensor)))
    buffer = torch.zeros(3)
    alive = weakref.ref(buffer)
    argument = pointer(buffer)
    del buffer
    assert alive() is not None and argument.value == alive().data_ptr()
    del argument
    assert alive() is None


def test_emulator_survives_a_thread_stack_overflow(selftest):
    out = torch.zeros(2)
    expect_error(selftest, selftest.lib.msda_emu_selftest_stack_overflow(pointer(out)), "cudaErrorIllegalAddress",
                 "stack overflow")


def test_emulator_ends_an_endless_loop(selftest):
    out = torch.zeros(32)
    selftest.set_time_limit(0.5)
    try:
        expect_error(selftest, selftest.lib.msda_emu_selftest_endless_loop(pointer(out)), "cudaErrorLaunchTimeout",
                     "time limit", "endless_loop_kernel")
    finally:
        selftest.set_time_limit(300)


def test_emulator_turns_a_device_assert_into_a_launch_error(selftest):
    out = torch.zeros(32)
    expect_error(selftest, selftest.lib.msda_emu_selftest_assert(pointer(out)), "cudaErrorAssert",
                 "thread 7 must not get here", "thread (7,0,0)")
