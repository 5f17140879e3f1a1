#if canImport(Glibc)
import Glibc
#endif

/// Runs `body` on a new detached pthread (the daemon's few threads: the event loop, the pool refill
/// worker). False, with `body` dropped, when no thread could be made.
@discardableResult
public func detachThread(_ body: @escaping @Sendable () -> Void) -> Bool {
    final class Box { let body: @Sendable () -> Void; init(_ body: @escaping @Sendable () -> Void) { self.body = body } }
    let context = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { raw in Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().body(); return nil }, context)
    guard rc == 0 else { Unmanaged<Box>.fromOpaque(context).release(); return false }
    pthread_detach(thread)
    return true
}
