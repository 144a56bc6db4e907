/* Fails the build if src/ffi.rs no longer matches the installed tox.h. */
#include <tox/tox.h>

_Static_assert(TOX_PUBLIC_KEY_SIZE == 32, "public key size");
_Static_assert(TOX_ADDRESS_SIZE == 38, "address size");
_Static_assert(TOX_MAX_CUSTOM_PACKET_SIZE == 1373, "custom packet size");
_Static_assert(sizeof(Tox_Connection) == sizeof(int), "enums are ints");
_Static_assert(TOX_CONNECTION_NONE == 0 && TOX_CONNECTION_TCP == 1 && TOX_CONNECTION_UDP == 2, "Tox_Connection");
_Static_assert(TOX_SAVEDATA_TYPE_NONE == 0 && TOX_SAVEDATA_TYPE_TOX_SAVE == 1, "Tox_Savedata_Type");
_Static_assert(TOX_ERR_NEW_OK == 0, "Tox_Err_New");
_Static_assert(TOX_ERR_FRIEND_ADD_OK == 0 && TOX_ERR_FRIEND_ADD_ALREADY_SENT == 5, "Tox_Err_Friend_Add");
_Static_assert(TOX_ERR_FRIEND_CUSTOM_PACKET_OK == 0, "Tox_Err_Friend_Custom_Packet");
_Static_assert(TOX_ERR_BOOTSTRAP_OK == 0, "Tox_Err_Bootstrap");
_Static_assert(TOX_ERR_FRIEND_BY_PUBLIC_KEY_OK == 0, "Tox_Err_Friend_By_Public_Key");
_Static_assert(TOX_ERR_GET_PORT_OK == 0, "Tox_Err_Get_Port");
_Static_assert(TOX_ERR_FRIEND_DELETE_OK == 0, "Tox_Err_Friend_Delete");

/* Referenced so the object file is not empty. */
int veilmesh_tox_abi_checked(void) { return 1; }
