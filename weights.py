"""
Reading and writing weights, shared by clip.py, llama.py and tinyllava.py.

A Hugging Face checkpoint directory holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json. We load it with one explicit key map per model:

    key_map = {our_parameter_name: "hf.tensor.name"}                       # a plain rename
    key_map = {our_parameter_name: [("hf.q_proj.weight", 64), ...]}         # HF tensors stacked along dim 0 (fused)

Loading is strict: every missing, unexpected or mis-shaped tensor is named in one error. Each tensor is read from the
memory-mapped file and copied straight into the model's own storage in the target dtype, so loading a model needs
about its own size in memory, never two copies.
"""
import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read_config(path):
    """The parsed config.json of a checkpoint directory, with a clear error when it is not one."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json here; expected a Hugging Face checkpoint directory")
    with open(config_path) as f:
        return json.load(f)


def safetensors_files(path):
    """The .safetensors files of a checkpoint directory: a single model.safetensors or the shards of an index."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            shard_names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in shard_names]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found "
                            "(only safetensors checkpoints are read; .bin pickles are not)")


def _parts(source):
    """A key-map value as a list of (hf_name, rows); rows None means 'the whole parameter'."""
    return [(source, None)] if isinstance(source, str) else list(source)


def empty_model(model_class, config, dtype=torch.float32, device="cpu"):
    """A model with uninitialized storage in `dtype` on `device`, built on the meta device so that no float32 copy
    of it ever exists; load_hf_weights then fills every parameter."""
    with torch.device("meta"):
        model = model_class(config)
    return model.to(dtype).to_empty(device=device)


def checkpoint_keys(path):
    """Names of all tensors stored in a checkpoint directory (reads only the file headers)."""
    names = set()
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as handle:
            names.update(handle.keys())
    return names


def load_hf_weights(model, path, key_map, owned_prefixes=("",), ignored_suffixes=()):
    """
    Fill every parameter of `model` (already on its device and in its dtype) from the checkpoint at `path`.

    Tensors in the files whose names start with one of `owned_prefixes` must all be used by the map (others belong to
    other models in the same file, e.g. the text tower of a CLIPModel when only the vision tower is loaded); names
    ending with one of `ignored_suffixes` are buffers HF stored that we recompute (position_ids, rotary inv_freq).
    """
    params = dict(model.named_parameters())
    assert set(key_map) == set(params), f"key map and model disagree: {sorted(set(key_map) ^ set(params))}"

    files = safetensors_files(path)
    handles = [safe_open(f, framework="pt", device="cpu") for f in files]
    where = {name: h for h in handles for name in h.keys()}

    # check everything before touching a single parameter, and report all problems at once
    missing, misshaped, used = [], [], set()
    for our_name, source in key_map.items():
        parts = _parts(source)
        for hf_name, rows in parts:
            used.add(hf_name)
            if hf_name not in where:
                missing.append(hf_name)
                continue
            expected = tuple(params[our_name].shape) if rows is None else (rows, *params[our_name].shape[1:])
            found = tuple(where[hf_name].get_slice(hf_name).get_shape())
            if found != expected:
                misshaped.append(f"{hf_name}: found {found}, expected {expected}")
        if len(parts) > 1 and sum(rows for _, rows in parts) != params[our_name].shape[0]:
            misshaped.append(f"{our_name}: fused rows {[r for _, r in parts]} do not add up to {params[our_name].shape}")
    unexpected = [name for name in where if name not in used and name.startswith(owned_prefixes)
                  and not name.endswith(tuple(ignored_suffixes))]
    if missing or unexpected or misshaped:
        lines = [f"{path}: checkpoint does not match the model"]
        lines += [f"  missing tensor: {n}" for n in sorted(missing)]
        lines += [f"  unexpected tensor: {n}" for n in sorted(unexpected)]
        lines += [f"  mis-shaped tensor: {n}" for n in misshaped]
        raise ValueError("\n".join(lines))

    with torch.no_grad():
        for our_name, source in key_map.items():
            param, row = params[our_name], 0
            for hf_name, rows in _parts(source):
                tensor = where[hf_name].get_tensor(hf_name)  # one tensor in its stored dtype, freed after the copy
                rows = tensor.shape[0] if rows is not None else None
                target = param if rows is None else param[row:row + rows]
                target.copy_(tensor)  # copy_ casts to the parameter's dtype and device in place
                row += rows or 0
    return model


def hf_state_dict(params, key_map):
    """The inverse of load_hf_weights: our parameters (a dict by name) renamed, and fused ones split, into HF's names."""
    out = {}
    for our_name, source in key_map.items():
        tensor = params[our_name].detach()
        parts = _parts(source)
        if len(parts) == 1 and parts[0][1] is None:
            out[parts[0][0]] = tensor.contiguous()
        else:
            for (hf_name, _), piece in zip(parts, tensor.split([rows for _, rows in parts])):
                out[hf_name] = piece.contiguous()
    return out


def atomic_write(path, write):
    """Write a file through `write(tmp_path)` into a temporary name, then rename: a crash never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_hf_weights(state_dict, path):
    """Write tensors as model.safetensors (atomically) in a HF checkpoint directory."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(os.path.join(path, "model.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def write_json(obj, path):
    def write(tmp_path):
        with open(tmp_path, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)
