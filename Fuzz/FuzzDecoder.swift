// libFuzzer entry point for the DmaBufWire decoder. Not part of the SwiftPM package: scripts/fuzz compiles
// it together with the DmaBufWire sources into one module (DmaBufWireFuzz) with -sanitize=fuzzer,address.
//
// Input layout: the first byte picks how many fds "arrived" with the message (byte % 3, so 0, 1 or 2);
// the rest is the message. Every input is decoded both as a request and as a response. Decoding must
// either succeed or throw WireDecodingError (a trap or an ASan report is a finding), and every success
// must survive a round trip: re-encoding the value gives the input's canonical form (the input with the
// reserved header field zeroed, and the request id zeroed for events, which always go out with id 0), and
// that decodes to an equal value. A mismatch traps so that libFuzzer saves the input.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 1 else { return 0 }
    let descriptors = Int(data[0] % 3)
    let message = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    checkRequest(message, descriptors: descriptors)
    checkResponse(message, descriptors: descriptors)
    return 0
}

/// The bytes a decoded message must re-encode to.
private func canonical(_ bytes: [UInt8], event: Bool) -> [UInt8] {
    var copy = bytes
    copy[18] = 0; copy[19] = 0  // reserved
    if event { for i in 8..<12 { copy[i] = 0 } }  // request id
    return copy
}

private func checkRequest(_ bytes: [UInt8], descriptors: Int) {
    guard let (header, request) = try? WireMessage.decodeRequest(bytes, descriptors: descriptors) else { return }
    precondition(bytes.count >= WireLimits.headerSize && bytes.count <= WireLimits.maximumMessageSize,
                 "decodeRequest accepted \(bytes.count) bytes")
    precondition(WireMessage.descriptorRange(of: request.type).contains(descriptors),
                 "decodeRequest accepted \(request.type) with \(descriptors) fds")
    precondition(header.type == request.type.rawValue, "header type \(header.type) but decoded \(request.type)")
    let again = WireMessage.encode(request, requestID: header.requestID, descriptors: descriptors, version: header.version)
    guard again == canonical(bytes, event: false) else {
        fatalError("request \(request) re-encodes to \(again), not \(bytes)")
    }
    guard let (header2, request2) = try? WireMessage.decodeRequest(again, descriptors: descriptors, version: header.version),
          request2 == request, header2 == header
    else { fatalError("request \(request) does not decode again to itself") }
}

private func checkResponse(_ bytes: [UInt8], descriptors: Int) {
    guard let (header, response) = try? WireMessage.decodeResponse(bytes, descriptors: descriptors) else { return }
    precondition(bytes.count >= WireLimits.headerSize && bytes.count <= WireLimits.maximumMessageSize,
                 "decodeResponse accepted \(bytes.count) bytes")
    precondition(WireMessage.descriptorRange(of: response.type).contains(descriptors),
                 "decodeResponse accepted \(response.type) with \(descriptors) fds")
    precondition(header.type == response.type.rawValue, "header type \(header.type) but decoded \(response.type)")
    let again = WireMessage.encode(response, requestID: header.requestID, descriptors: descriptors, version: header.version)
    guard again == canonical(bytes, event: response.isEvent) else {
        fatalError("response \(response) re-encodes to \(again), not \(bytes)")
    }
    guard let (_, response2) = try? WireMessage.decodeResponse(again, descriptors: descriptors, version: header.version),
          response2 == response else {
        fatalError("response \(response) does not decode again to itself")
    }
}
