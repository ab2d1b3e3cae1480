"""Test helper: write a network as an OFFICIAL EDM snapshot pickle, without any NVIDIA code.

An official snapshot (NVlabs/edm training/training_loop.py) is pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=...,
dataset_kwargs=...)). Every network class and the loss are torch_utils.persistence objects: each reduces to
torch_utils.persistence._reconstruct_persistent_obj(meta), meta = dict(type='class', version=6,
module_src=<source text of the defining module>, class_name=<name>, state=<the object's __dict__ incl. _init_args
and _init_kwargs>) (reference edm_fid.md 2.2). Torch containers (ModuleDict) and tensors pickle the ordinary way.

To make the stream name exactly that global, a throw-away `torch_utils.persistence` module holding a stand-in
function is registered in sys.modules for the duration of the dump and removed afterwards (reference 2.3 point 4).
Usage: `from official_format import write_edm_pickle` (tests/ is on pythonpath, see pytest.ini).
"""
import copy
import pickle
import sys
import types

import torch

import edm_net

PLACEHOLDER_SRC = '# stands in for the source text of training/networks.py that official snapshots carry\n'


class EDMLossState:
    """The snapshot's `loss_fn`: official training/loss.py EDMLoss() with its defaults (a persistent plain object)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self._init_args, self._init_kwargs = (), {}


def _stand_in_reconstruct(meta):
    raise RuntimeError('official_format: stand-in, only used while pickling')


_stand_in_reconstruct.__module__ = 'torch_utils.persistence'
_stand_in_reconstruct.__name__ = _stand_in_reconstruct.__qualname__ = '_reconstruct_persistent_obj'


class _OfficialPickler(pickle.Pickler):
    """Pickles our edm_net modules (and EDMLossState) as persistent objects; everything else as usual."""

    def __init__(self, file, module_src):
        super().__init__(file, protocol=4)  # protocol 4: the default of the Pythons that wrote the 2022 snapshots
        self.module_src = module_src

    def reducer_override(self, obj):
        if isinstance(obj, EDMLossState):
            class_name, state = 'EDMLoss', dict(vars(obj))
        elif isinstance(obj, torch.nn.Module) and type(obj).__module__ == edm_net.__name__:
            class_name, state = type(obj).__name__, obj.__getstate__()  # Module state = its __dict__ (official)
            if '_init_kwargs' in state:  # ours records them on EDMPrecond; the official decorator on every class
                state = {**state, '_init_args': ()}
        else:
            return NotImplemented
        meta = dict(type='class', version=6, module_src=self.module_src, class_name=class_name, state=state)
        return _stand_in_reconstruct, (meta,)


def write_edm_pickle(net, path, extra=None, module_src=PLACEHOLDER_SRC):
    """Write {'ema': net, 'loss_fn': EDMLoss, 'augment_pipe': None, 'dataset_kwargs': {...}} (+ `extra` entries)
    to `path` in the official format. `net` is copied and stored as the training loop stores it: eval mode,
    requires_grad False, on CPU. `module_src` is the text put in every meta (the official loader would exec it;
    edm_net.load_edm_pickle must never read it). Returns path."""
    ema = copy.deepcopy(net).cpu().eval().requires_grad_(False)
    dataset_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path='datasets/dataset.zip',
                          use_labels=bool(net.label_dim), xflip=False, cache=True, resolution=net.img_resolution,
                          max_size=None)
    data = dict(ema=ema, loss_fn=EDMLossState(), augment_pipe=None, dataset_kwargs=dataset_kwargs, **(extra or {}))

    package = types.ModuleType('torch_utils')
    package.persistence = types.ModuleType('torch_utils.persistence')
    package.persistence._reconstruct_persistent_obj = _stand_in_reconstruct
    names = {'torch_utils': package, 'torch_utils.persistence': package.persistence}
    previous = {name: sys.modules.get(name) for name in names}
    sys.modules.update(names)
    try:
        with open(path, 'wb') as f:
            _OfficialPickler(f, module_src).dump(data)
    finally:
        for name, module in previous.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return path
