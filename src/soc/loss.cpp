#include "tilt/soc/loss.h"

#include "tilt/core/error.h"

namespace tilt {

// Loss's one out-of-line virtual: its vtable lives in the soc layer, with the interface.
void Loss::set_batch_size(int64_t) {
  throw Error("the " + name() + " loss cannot draw its batch in shards");
}

}  // namespace tilt
