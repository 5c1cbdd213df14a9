"""(old home) of the toy world, now the package ``gift_fast.toy``: this module re-exports its names so
that ``from gift_fast.data.toy import ...`` keeps working until every importer uses ``gift_fast.toy``."""
from dataclasses import asdict as dataclasses_asdict  # noqa: F401  (old home)

from gift_fast.toy import *  # noqa: F401,F403  (old home)
from gift_fast.toy import __all__  # noqa: F401  (old home)
from gift_fast.toy.pretrain import _match_matrix, _pretrain, _readable_safetensors  # noqa: F401  (old home)
from gift_fast.toy.tasks import _task_images  # noqa: F401  (old home)
from gift_fast.toy.world import (_digit_glyphs, _digit_mask, _grid, _shape_mask, _texture,  # noqa: F401
                                 _to_chw)
from gift_fast.toy.world import ATTRIBUTE_VALUES as _VALUES  # noqa: F401  (old home)
