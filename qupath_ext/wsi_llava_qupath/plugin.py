"""pluggy hooks of the QuPath bridge: ``wsi-llava qupath`` commands, a reader, a result sink.

Nothing heavy is imported here (no py4j/qubalab/torch): they load when a command runs.
"""

from __future__ import annotations

from wsi_llava import hookimpl


@hookimpl
def register_commands(cli):
    from wsi_llava_qupath.commands import qupath

    if "qupath" not in cli.commands:
        cli.add_command(qupath)


@hookimpl
def register_slide_readers(register):
    from wsi_llava_qupath.reader import POINTER_SUFFIX, open_qupath_image

    register(
        "qupath",
        open_qupath_image,
        suffixes=(POINTER_SUFFIX,),
        priority=100,
        description="the image open in QuPath, read through its py4j gateway (qubalab)",
    )


@hookimpl
def register_sinks(register):
    from wsi_llava_qupath.sink import qupath_sink

    register(
        "qupath", qupath_sink, description="writes answers into QuPath annotations (when asked from QuPath)"
    )
