"""The XIP file operations (the seed's third step): file objects that read and write straight
between your buffers and the storage (``file``), mappings of the storage itself (``mapping``),
sendfile (``transfer``) and asyncio file objects (``aio``)."""
