"""Test helper: write a network in the OFFICIAL EDM snapshot-pickle format, without NVIDIA code.

Official snapshots (NVlabs/edm training_loop.py) are `pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=...,
dataset_kwargs=...))`, and every network module is a torch_utils.persistence object that reduces to
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with
meta = dict(type='class', version=6, module_src=<source text>, class_name=<name>, state=<the module's __dict__>)
(reference edm_fid.md 2.2). Here a throw-away module registered under that name in sys.modules for the duration
of the dump makes the stream name exactly the official global (reference 2.3, point 4). Plain torch containers
(ModuleDict) and tensors pickle the normal way, as in the official files.
"""
import copy
import pickle
import sys
import types

import torch

import edm_net

PLACEHOLDER_SRC = '# module source text (the official writer stores training/networks.py here)\n'


def write_edm_pickle(net, path, extra=None, module_src=PLACEHOLDER_SRC):
    """Pickle {'ema': net (eval, requires_grad False, as the official training loop stores it), 'loss_fn': None,
    'augment_pipe': None, 'dataset_kwargs': {}} plus `extra` entries to `path` in the official format.
    `module_src` is the text stored in every meta (the official loader would exec it; ours never reads it)."""
    def _reconstruct_persistent_obj(meta):
        raise RuntimeError('official_format: this stand-in exists only while pickling')

    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    package = types.ModuleType('torch_utils')
    persistence = types.ModuleType('torch_utils.persistence')
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = persistence

    class OfficialPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, torch.nn.Module) and type(obj).__module__ == edm_net.__name__:
                state = dict(obj.__getstate__())
                kwargs = state.pop('init_kwargs', {})  # ours; the official decorator stores it as _init_kwargs
                state['_init_args'] = ()
                state['_init_kwargs'] = kwargs
                meta = dict(type='class', version=6, module_src=module_src, class_name=type(obj).__name__,
                            state=state)
                return _reconstruct_persistent_obj, (meta,)
            return NotImplemented

    ema = copy.deepcopy(net).eval().requires_grad_(False)
    data = dict(ema=ema, loss_fn=None, augment_pipe=None, dataset_kwargs={}, **(extra or {}))
    names = ['torch_utils', 'torch_utils.persistence']
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update({'torch_utils': package, 'torch_utils.persistence': persistence})
    try:
        with open(path, 'wb') as f:
            OfficialPickler(f, protocol=4).dump(data)  # protocol 4: Python 3.8-3.13 default, as in 2022 snapshots
    finally:
        for name in names:
            if saved[name] is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]
    return path
