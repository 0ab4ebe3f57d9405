"""The run's mesh (train/runtime.py): sizes per slice (ICI) and across slices (DCN), topology-aware device order via
jax.make_mesh / create_hybrid_device_mesh, the dcn_* config keys, the mesh context of jitted steps, and the
persistent compilation cache key. 8 simulated CPU devices form one slice; multi-slice layouts are checked on
stand-in device objects carrying slice/process indices."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from train.config import ConfigError, MeshConfig, load_config
from train.runtime import hybrid_device_grid, make_mesh, mesh_shape, on_mesh, slice_granules

ROOT = Path(__file__).resolve().parent.parent


def test_make_mesh_on_one_slice_is_jax_make_mesh():
    mesh = make_mesh(load_config(None, ["mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2"]))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 4
    expected = jax.make_mesh((2, 2, 2, 1), mesh.axis_names, axis_types=(AxisType.Auto,) * 4)
    assert (mesh.devices == expected.devices).all()
    # one process may use fewer devices than present (the first ones)
    assert make_mesh(load_config(None, ["mesh.data=1"])).devices.tolist() == [[[[jax.devices()[0]]]]]


@pytest.mark.parametrize("sizes, devices, slices, ici, dcn", [
    ({}, 8, 1, (8, 1, 1, 1), (1, 1, 1, 1)),
    ({"data": 1, "fsdp": -1, "tensor": 2}, 8, 1, (1, 4, 2, 1), (1, 1, 1, 1)),
    ({"dcn_data": 2}, 16, 2, (8, 1, 1, 1), (2, 1, 1, 1)),             # data: 8 per slice x 2 slices
    ({"data": 1, "fsdp": -1, "dcn_data": 4}, 256, 4, (1, 64, 1, 1), (4, 1, 1, 1)),  # HSDP over 4 slices
    ({"data": 2, "fsdp": 2, "dcn_fsdp": 2, "dcn_expert": 2}, 16, 4, (2, 2, 1, 1), (1, 2, 1, 2)),
])
def test_mesh_shape(sizes, devices, slices, ici, dcn):
    assert mesh_shape(MeshConfig(**sizes), devices, slices) == (ici, dcn)


@pytest.mark.parametrize("sizes, devices, slices, processes, message", [
    ({"dcn_data": 3}, 16, 2, 1, r"spans 3 slices but the devices form 2; make the dcn_\* product 2"),
    ({"data": 4, "dcn_data": 2}, 16, 2, 1, "needs 4 devices per slice but each of the 2 slices has 8"),
    ({"data": -1, "fsdp": 3}, 8, 1, 1, "8 devices per slice are not divisible by the fixed axes' product 3"),
    ({"data": 16}, 8, 1, 1, "needs 16 devices but 8 are present"),
    ({"data": 4}, 8, 1, 2, "needs 4 devices but 8 are present"),     # several processes must use every device
])
def test_mesh_shape_refuses(sizes, devices, slices, processes, message):
    with pytest.raises(ConfigError, match=message):
        mesh_shape(MeshConfig(**sizes), devices, slices, processes)


def test_dcn_keys_are_config_keys():
    cfg = load_config(None, ["mesh.dcn_data=2", "mesh.fsdp=4"])
    assert (cfg.mesh.dcn_data, cfg.mesh.dcn_fsdp, cfg.mesh.fsdp) == (2, 1, 4)
    with pytest.raises(ConfigError, match=r"mesh.dcn_fsdp=0: a dcn_\* size counts slices and must be >= 1"):
        load_config(None, ["mesh.dcn_fsdp=0"])
    with pytest.raises(ConfigError, match="dcn_tensr"):
        load_config(None, ["mesh.dcn_tensr=2"])
    # 8 CPU devices are one slice (one process): a dcn axis > 1 has no slices to span
    with pytest.raises(ConfigError, match=r"spans 2 slices but the devices form 1; make the dcn_\* product 1"):
        make_mesh(load_config(None, ["mesh.dcn_data=2"]))


@dataclasses.dataclass(frozen=True)
class StandIn:
    """A device as mesh_utils sees it off TPU (laid out in list order within a slice)."""
    id: int
    process_index: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def slice_of(grid):
    return np.vectorize(lambda d: d.slice_index)(grid)


def test_make_mesh_refuses_slices_without_dcn_axes():
    devices = [StandIn(i, process_index=i // 4, slice_index=i // 4) for i in range(8)]
    with pytest.raises(ConfigError, match="the devices form 2 TPU slices; set mesh.dcn_data=2"):
        make_mesh(load_config(None, ["mesh.fsdp=-1", "mesh.data=1"]), devices)


def test_hybrid_grid_keeps_each_slice_in_one_block():
    # 2 slices of 4 devices, listed interleaved: only the dcn axis crosses slices
    devices = [StandIn(i, process_index=i % 2, slice_index=i % 2) for i in range(8)]
    assert slice_granules(devices) == ("slice_index", 2)
    ici, dcn = mesh_shape(MeshConfig(data=1, fsdp=-1, dcn_data=2), len(devices), 2)
    grid = hybrid_device_grid(ici, dcn, devices)
    assert grid.shape == (2, 4, 1, 1)
    np.testing.assert_array_equal(slice_of(grid), [[[[0]]] * 4, [[[1]]] * 4])
    # fsdp across slices: fsdp = 2 per slice x 2 slices, slice 0 holds fsdp 0-1 of every data row
    ici, dcn = mesh_shape(MeshConfig(data=2, fsdp=2, dcn_fsdp=2), len(devices), 2)
    grid = hybrid_device_grid(ici, dcn, devices)
    assert grid.shape == (2, 4, 1, 1)
    np.testing.assert_array_equal(slice_of(grid)[..., 0, 0], [[0, 0, 1, 1], [0, 0, 1, 1]])
    assert sorted(d.id for d in grid.flat) == list(range(8))


@dataclasses.dataclass(frozen=True)
class ProcessOnly:
    """A device without slice_index (as on GPU)."""
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_hybrid_grid_over_processes_without_slices():
    # GPU hosts: no slice_index, so each process is a DCN unit (2 hosts of 4 GPUs, data across hosts)
    devices = [ProcessOnly(i, process_index=i // 4) for i in range(8)]
    assert slice_granules(devices) == ("process_index", 2)
    grid = hybrid_device_grid((4, 1, 1, 1), (2, 1, 1, 1), devices)
    assert grid.shape == (8, 1, 1, 1)
    assert [d.process_index for d in grid.flat] == [0] * 4 + [1] * 4


def test_on_mesh_sets_the_mesh_while_tracing():
    mesh = make_mesh(load_config(None, ["mesh.data=4", "mesh.tensor=2"]))
    seen = []
    step = jax.jit(lambda x: seen.append(jax.sharding.get_abstract_mesh()) or x + 1)
    assert int(on_mesh(mesh, step)(1)) == 2
    assert seen == [mesh.abstract_mesh]
    assert jax.sharding.get_abstract_mesh().empty    # only during the call


def test_compile_cache_dir_is_written_by_a_run(tmp_path):
    # a fresh process (jax opens its cache once): the config key, applied before the first compile, fills the dir
    cache = tmp_path / "xla-cache"
    code = ("import jax, jax.numpy as jnp; from train.config import load_config; "
            "from train.runtime import use_compile_cache; "
            f"use_compile_cache(load_config(None, ['compile_cache_dir={cache}'])); "
            "print(jax.config.jax_compilation_cache_dir); jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8)))")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(cache)
    assert any(cache.iterdir())
