"""Reads `torch.save` state dicts (`.pth`/`.pt`/`.bin`) without torch.

Since torch 1.6 `torch.save` writes a zip archive: `<root>/data.pkl` pickles the object, with each
tensor as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and each storage as
a persistent id `("storage", <dtype>Storage, key, location, numel)` whose bytes are the archive
member `<root>/data/<key>` (byte order in `<root>/byteorder`, little-endian when absent). The
unpickler below resolves only those names (and OrderedDict), so, like `torch.load(...,
weights_only=True)`, a file cannot run code. Files of the pre-1.6 format are refused with the way
to convert them.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import numpy as np

_DTYPES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
           "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
           "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
           "BoolStorage": np.bool_}


class _StorageType:
  def __init__(self, name):
    self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  # A corrupt file must not make as_strided read outside the storage.
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
  if (len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0
      or last >= storage.size):
    raise ValueError(f"tensor of size {size} and stride {stride} at offset {offset} does not fit "
                     f"its storage of {storage.size} elements")
  if not all(size):
    return np.zeros(size, storage.dtype)
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=tuple(s * storage.itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, archive: zipfile.ZipFile, root: str, byteorder: str, name: str):
    super().__init__(file)
    self._archive, self._root, self._order, self._name = archive, root, byteorder, name

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _DTYPES:
      return _StorageType(name)
    raise ValueError(f"{self._name}: holds {module}.{name}, which is not part of a plain state "
                     "dict of tensors (re-save it with torch.save(model.state_dict(), path))")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise ValueError(f"{self._name}: unexpected persistent id {' '.join(repr(pid).split())[:80]}")
    storage_type, key = pid[1], pid[2]
    raw = self._archive.read(f"{self._root}/data/{key}")
    dtype = _DTYPES[storage_type.name]
    if dtype == "bfloat16":  # numpy has none: the upper half of a float32
      bits = np.frombuffer(raw, dtype=np.dtype("<u2" if self._order == "little" else ">u2"))
      return (bits.astype(np.uint32) << 16).view(np.float32)
    dt = np.dtype(dtype).newbyteorder("<" if self._order == "little" else ">")
    return np.frombuffer(raw, dtype=dt).astype(np.dtype(dtype))


def load(path: str, name: str):
  """The unpickled object of a torch zip checkpoint (tensors as NumPy arrays)."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{name}: not a torch zip checkpoint (torch >= 1.6 writes those; an older "
                     "file needs torch to read: pip install repsim_jax[torch], or convert it with "
                     "torch.save(torch.load(path), path))")
  try:
    with zipfile.ZipFile(path) as archive:
      pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
      if not pkl:
        raise ValueError(f"{name}: a zip file without a data.pkl; not a torch checkpoint")
      root = pkl[0].split("/")[0]
      names = set(archive.namelist())
      order = (archive.read(f"{root}/byteorder").decode().strip()
               if f"{root}/byteorder" in names else "little")
      with archive.open(pkl[0]) as f:
        return _Unpickler(io.BytesIO(f.read()), archive, root, order, name).load()
  except ValueError as e:
    if str(e).startswith(name):
      raise
    raise ValueError(f"{name}: not a readable torch checkpoint "
                     f"({' '.join(str(e).split())[:160]})") from None
  except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, TypeError,
          IndexError, AttributeError, OSError, MemoryError, OverflowError, RecursionError) as e:
    # MemoryError: a corrupt length field in the pickle asking for an impossible allocation.
    raise ValueError(f"{name}: not a readable torch checkpoint (truncated or corrupt: "
                     f"{type(e).__name__}: {' '.join(str(e).split())[:120]})"
                     ) from None
