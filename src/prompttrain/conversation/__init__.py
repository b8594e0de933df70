"""Pure logic over Messages API payloads: SSE parsing, response reconstruction, usage. No I/O imports."""
