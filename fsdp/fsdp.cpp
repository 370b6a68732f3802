// The FSDP engine lands with the engine issue; this target already links the
// comm interface so the layering (fsdp sees backends only) is enforced.
#include "backends/process_group.h"
