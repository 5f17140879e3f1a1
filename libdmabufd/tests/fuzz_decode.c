/* libFuzzer target for libdmabufd's decoder: any bytes, any fd count, either version. A decoded message
 * must encode back to exactly the bytes it came from (the reserved header field aside). */
#include "dmabufd_wire.h"

#include <stdlib.h>
#include <string.h>

static uint8_t out[DMABUFD_MAX_MESSAGE];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    unsigned fds = data[0] & 0x1f;
    uint16_t version = (data[0] >> 5) % 3; /* 0: before the handshake */
    dbw_response r;
    if (dbw_decode_response(data + 1, size - 1, fds, version, &r) != 0) return 0;
    int n = dbw_encode_response(&r, r.header.version, out, sizeof out);
    if (n != (int)(size - 1) || memcmp(out, data + 1, 18) != 0 || memcmp(out + 20, data + 21, (size_t)n - 20) != 0) {
        /* Events are written with request id 0 whatever arrived; anything else is a codec bug. */
        bool event = r.header.type >= 0x4001 && r.header.type <= 0x4004;
        if (!event || n != (int)(size - 1)) abort();
    }
    dmabufd_free(r.object);
    return 0;
}
