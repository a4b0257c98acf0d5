"""``gradtrust introspect``: train an entry's introspective network (the tutorial's second
stage) on labelled images and write it into the entry as ``introspection.onnx``.

:mod:`.network` is the MLP (torch) and its ONNX export, :mod:`.train` the feature
extraction and the training loop, :mod:`.report` the comparison of both stages on clean
and corrupted data, :mod:`.cli` the command.
"""
