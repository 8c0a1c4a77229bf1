"""Dataset loaders: each reads one published layout into an *image table*.

An image table is a ``pandas.DataFrame`` with one row per image:

- ``path``: absolute path of the image file (a results folder records it relative to ``image_root``)
- ``label``: class name (str)
- ``group``: patient or lesion id when the dataset has one, else ``None``
- ``origin``: the folder split the dataset ships with (``"train"``, ``"test"``) or ``""``

Any other column is per-image *metadata* (``metadata_columns``): HAM10000's ``age``,
``sex``, ``localization`` and ``dx_type``, or a folder study's ``Dataset(options=
{"metadata": "meta.csv"})``. Numbers stay numeric, text is text, a missing value is
NA. ``search.prepare`` writes them into ``splits.parquet`` and ``analysis.subgroups``
scores the final model per subgroup with them. Their names may not be those the
pipeline adds (``PIPELINE_COLUMNS``).

Loaders only list files and labels; decoding happens once, in ``trainables.data``.
"""

from trainables.datasets._registry import (
    DatasetError,
    LoaderSpec,
    get_loader,
    image_root,
    list_loaders,
    load_table,
    metadata_columns,
    register_loader,
    relative_names,
)
from trainables.datasets import folder as _folder  # noqa: F401  (registers "folder" and "embedded")
from trainables.datasets import covid as _covid  # noqa: F401  (registers "covid")
from trainables.datasets import ham10000 as _ham10000  # noqa: F401  (registers "ham10000")
from trainables.datasets import melanoma as _melanoma  # noqa: F401  (registers "melanoma")

__all__ = ["DatasetError", "LoaderSpec", "get_loader", "image_root", "list_loaders", "load_table", "metadata_columns", "register_loader",
           "relative_names"]
