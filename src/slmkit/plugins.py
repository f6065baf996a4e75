"""Where slmkit's pluggable parts live, by name: the one table that says which module provides what.

Like a package's entry points, this names the providers without importing them, so a lower floor
can find an implementation that lives above it: :mod:`slmkit.models.readers` reads artefact formats
written by ``compress/`` without ``models/`` importing ``compress/``. Each value is
``"module:attribute"``, imported on first use.
"""

#: artefact format -> its :class:`slmkit.models.readers.Reader` (tried in this order by ``models.load``)
MODEL_READERS = {
    "packed-quantized": "slmkit.compress.qstore:READER",  # packed codes + scales written by `slmkit quantize`
    "lowrank": "slmkit.compress.lowrank:READER",  # factorised Linears written by `slmkit lowrank`
}
