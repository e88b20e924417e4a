"""A restricted unpickler for weight files (`.pkl`): a checkpoint is data, never code.

A pickle can name any importable callable and have it called while loading (`__reduce__`), so `pickle.load` on a
downloaded file runs whatever the file says. `load` admits only what a file of weights needs: plain containers
(dict, list, tuple, set, OrderedDict), numbers, strings, bytes, and numpy arrays, dtypes and scalars. Any other
global stops the load with `UnsafePickleError` naming the file and the global, before anything is called.
"""

import pickle

# (module, name) pairs a weights pickle may reference. numpy 1.x pickles name numpy.core, numpy 2.x numpy._core.
ALLOWED_GLOBALS = frozenset(
  [
    ('collections', 'OrderedDict'),
    ('builtins', 'dict'),
    ('builtins', 'list'),
    ('builtins', 'tuple'),
    ('builtins', 'set'),
    ('builtins', 'frozenset'),
    ('builtins', 'bytearray'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'),  # protocol-5 pickles of arrays
    ('numpy._core.numeric', '_frombuffer'),
    ('_codecs', 'encode'),  # protocol-2 pickles of bytes (python 2 era files such as detectron2's R-50.pkl)
  ]
)


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle references a global outside ALLOWED_GLOBALS (it could run code when loaded)."""


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(self, file, path):
    super().__init__(file, encoding='latin1')  # latin1: numpy arrays pickled by python 2
    self._path = path

  def find_class(self, module, name):
    if (module, name) not in ALLOWED_GLOBALS:
      raise UnsafePickleError(
        f'{self._path}: refused to load: the pickle references {module}.{name}, which is not a numpy array or a '
        'plain container (a weights file never needs it; loading it could run code). Only load files you trust, '
        'and convert them to plain arrays first.'
      )
    return super().find_class(module, name)

  def persistent_load(self, pid):
    raise UnsafePickleError(f'{self._path}: refused to load: the pickle uses persistent ids ({pid!r})')


def load(path):
  """The object pickled in `path`, built from numpy arrays and plain containers only."""
  with open(path, 'rb') as f:
    return _RestrictedUnpickler(f, path).load()
