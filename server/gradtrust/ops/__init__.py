"""Process management: starting, supervising, draining and stopping ``tritonserver``
(``gradtrust serve``). Runs outside the server; imports :mod:`gradtrust.errors` and the
wire contract only."""
