# jax_ep._nvshmem: the NVSHMEM transport, a nanobind module of its own so that
# jax_ep._C never needs libnvshmem. Include this file from the top-level
# CMakeLists.txt after CUDA is enabled and nanobind and Python are found:
#
#   include(cmake/nvshmem.cmake)
#
# It builds the module only when the pip wheel nvidia-nvshmem-cu13 (headers,
# libnvshmem_host.so.3, libnvshmem_device.a) is importable by
# ${Python_EXECUTABLE}; otherwise it says so and builds nothing.
#
# Options:
#   JAX_EP_NVSHMEM              AUTO (default): build when the wheel is found;
#                               ON: require it; OFF: skip. The environment
#                               variable JAX_EP_NVSHMEM, when set, wins.
#   JAX_EP_NVSHMEM_ROOT         the wheel's folder (with include/ and lib/);
#                               default: asked from Python (nvidia.nvshmem).
#   JAX_EP_NVSHMEM_OUTPUT_DIR   where the built module goes in the build tree
#                               (default ${CMAKE_BINARY_DIR}/jax_ep, like _C).
#
# Linking: host code against the wheel's libnvshmem_host.so.3 (no unversioned
# .so: -l:libnvshmem_host.so.3, with an rpath to the wheel's lib/ folder and one
# relative to an installed jax_ep next to nvidia/); device code with relocatable
# device code, device-linked inside the module against libnvshmem_device.a.
# jax_ep/nvshmem.py also preloads the wheel's libnvshmem_host.so.3 before
# importing the module, so the rpath need not match on another machine.

set(JAX_EP_NVSHMEM "AUTO" CACHE STRING "Build the NVSHMEM module jax_ep._nvshmem: AUTO, ON or OFF")
set_property(CACHE JAX_EP_NVSHMEM PROPERTY STRINGS AUTO ON OFF)
if(DEFINED ENV{JAX_EP_NVSHMEM})
  set(JAX_EP_NVSHMEM "$ENV{JAX_EP_NVSHMEM}")
endif()
string(TOUPPER "${JAX_EP_NVSHMEM}" JAX_EP_NVSHMEM)
set(JAX_EP_NVSHMEM_OUTPUT_DIR "${CMAKE_BINARY_DIR}/jax_ep" CACHE PATH
    "Build-tree folder of the jax_ep._nvshmem module")
get_filename_component(_jax_ep_nvshmem_src "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

if(JAX_EP_NVSHMEM MATCHES "^(OFF|0|FALSE)$")
  message(STATUS "jax_ep: JAX_EP_NVSHMEM=OFF; not building jax_ep._nvshmem")
  return()
elseif(NOT JAX_EP_NVSHMEM MATCHES "^(AUTO|ON|1|TRUE)$")
  message(FATAL_ERROR "jax_ep: JAX_EP_NVSHMEM must be AUTO, ON or OFF, got '${JAX_EP_NVSHMEM}'")
endif()

# A missing piece: AUTO skips with a message, ON stops.
macro(_jax_ep_nvshmem_missing why)
  if(JAX_EP_NVSHMEM STREQUAL "AUTO")
    message(STATUS "jax_ep: ${why}; not building jax_ep._nvshmem (the NVSHMEM transport)")
    return()
  endif()
  message(FATAL_ERROR "jax_ep: JAX_EP_NVSHMEM=${JAX_EP_NVSHMEM} but ${why}")
endmacro()

if(NOT CMAKE_CUDA_COMPILER)
  _jax_ep_nvshmem_missing("no CUDA compiler")
endif()
if(NOT TARGET nanobind-static AND NOT COMMAND nanobind_add_module)
  _jax_ep_nvshmem_missing("nanobind is not loaded (include this file after find_package(nanobind))")
endif()

# --- Find the wheel -----------------------------------------------------------
if(NOT JAX_EP_NVSHMEM_ROOT)
  # nvidia/ and nvidia/nvshmem are namespace packages (no __init__.py, no
  # __file__): ask for __path__[0].
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import nvidia.nvshmem as m; print(list(m.__path__)[0])"
    OUTPUT_VARIABLE _jax_ep_nvshmem_root OUTPUT_STRIP_TRAILING_WHITESPACE
    ERROR_QUIET
    RESULT_VARIABLE _jax_ep_rc)
  if(NOT _jax_ep_rc EQUAL 0 OR NOT _jax_ep_nvshmem_root)
    _jax_ep_nvshmem_missing("the NVSHMEM wheel is not importable by ${Python_EXECUTABLE} (pip install nvidia-nvshmem-cu13)")
  endif()
  set(JAX_EP_NVSHMEM_ROOT "${_jax_ep_nvshmem_root}")
endif()
set(JAX_EP_NVSHMEM_INCLUDE_DIR "${JAX_EP_NVSHMEM_ROOT}/include")
set(JAX_EP_NVSHMEM_LIB_DIR "${JAX_EP_NVSHMEM_ROOT}/lib")
foreach(_f "${JAX_EP_NVSHMEM_INCLUDE_DIR}/nvshmem.h" "${JAX_EP_NVSHMEM_INCLUDE_DIR}/non_abi/nvshmem_version.h"
           "${JAX_EP_NVSHMEM_LIB_DIR}/libnvshmem_host.so.3" "${JAX_EP_NVSHMEM_LIB_DIR}/libnvshmem_device.a")
  if(NOT EXISTS "${_f}")
    _jax_ep_nvshmem_missing("the NVSHMEM wheel at ${JAX_EP_NVSHMEM_ROOT} has no ${_f}")
  endif()
endforeach()
file(STRINGS "${JAX_EP_NVSHMEM_INCLUDE_DIR}/non_abi/nvshmem_version.h" _jax_ep_nvshmem_ver
     REGEX "#define NVSHMEM_VENDOR_(MAJOR|MINOR|PATCH)_VERSION ")
string(REGEX REPLACE ".*MAJOR_VERSION ([0-9]+).*MINOR_VERSION ([0-9]+).*PATCH_VERSION ([0-9]+).*"
       "\\1.\\2.\\3" JAX_EP_NVSHMEM_VERSION "${_jax_ep_nvshmem_ver}")
message(STATUS "jax_ep: building jax_ep._nvshmem against NVSHMEM ${JAX_EP_NVSHMEM_VERSION} in ${JAX_EP_NVSHMEM_ROOT}")

if(NOT TARGET CUDA::cudart_static)
  find_package(CUDAToolkit REQUIRED)
endif()
# CUDA 13 moved cuda/std/* under include/cccl; NVSHMEM's headers include them
# from host C++ too.
set(_jax_ep_cccl "")
foreach(_d ${CUDAToolkit_INCLUDE_DIRS})
  if(EXISTS "${_d}/cccl")
    list(APPEND _jax_ep_cccl "${_d}/cccl")
  endif()
endforeach()

# --- The libraries --------------------------------------------------------------
if(NOT TARGET jax_ep::nvshmem_device)
  add_library(jax_ep::nvshmem_device STATIC IMPORTED)
  set_target_properties(jax_ep::nvshmem_device PROPERTIES
    IMPORTED_LOCATION "${JAX_EP_NVSHMEM_LIB_DIR}/libnvshmem_device.a")
endif()

# --- The module -------------------------------------------------------------------
nanobind_add_module(_nvshmem NB_STATIC
  "${_jax_ep_nvshmem_src}/xla_ffi/nvshmem_module.cc"
  "${_jax_ep_nvshmem_src}/xla_ffi/nvshmem_runtime.cc"
  # Kernels that call NVSHMEM device functions (the put path) must be in this
  # module: it is the one registered with the host library.
  "${_jax_ep_nvshmem_src}/cuda/ll_put_dispatch.cu"
  "${_jax_ep_nvshmem_src}/cuda/ll_put_combine.cu"
  "${_jax_ep_nvshmem_src}/cuda/ll_put_direct.cu"
  "${_jax_ep_nvshmem_src}/cuda/internode_notify.cu"
  "${_jax_ep_nvshmem_src}/cuda/internode_dispatch.cu"
  "${_jax_ep_nvshmem_src}/cuda/internode_pipeline.cu"
  "${_jax_ep_nvshmem_src}/cuda/internode_combine.cu"
  # Their XLA FFI handlers and buffer registry (plain C++).
  "${_jax_ep_nvshmem_src}/xla_ffi/ll_put.cc"
  "${_jax_ep_nvshmem_src}/xla_ffi/internode.cc"
  "${_jax_ep_nvshmem_src}/xla_ffi/ll_put_buffers.cc")
target_include_directories(_nvshmem PRIVATE "${_jax_ep_nvshmem_src}/cuda")
target_compile_definitions(_nvshmem PRIVATE JAX_EP_WITH_NVSHMEM=1)
# The runtime holds the kernels and every NVSHMEM call: compile it as CUDA.
set_source_files_properties("${_jax_ep_nvshmem_src}/xla_ffi/nvshmem_runtime.cc"
  TARGET_DIRECTORY _nvshmem PROPERTIES LANGUAGE CUDA)
target_include_directories(_nvshmem SYSTEM PRIVATE
  "${JAX_EP_NVSHMEM_INCLUDE_DIR}"
  "$<$<COMPILE_LANGUAGE:CXX>:${XLA_FFI_INCLUDE_DIR}>"
  "$<$<COMPILE_LANGUAGE:CXX>:${_jax_ep_cccl}>")
target_link_directories(_nvshmem PRIVATE "${JAX_EP_NVSHMEM_LIB_DIR}")
target_link_libraries(_nvshmem PRIVATE jax_ep::nvshmem_device CUDA::cudart_static
  "-l:libnvshmem_host.so.3")
set_target_properties(_nvshmem PROPERTIES
  CUDA_SEPARABLE_COMPILATION ON
  CUDA_RESOLVE_DEVICE_SYMBOLS ON
  CUDA_RUNTIME_LIBRARY Static
  POSITION_INDEPENDENT_CODE ON
  CUDA_VISIBILITY_PRESET hidden
  LIBRARY_OUTPUT_DIRECTORY "${JAX_EP_NVSHMEM_OUTPUT_DIR}"
  # Build tree: the wheel found here. Installed (site-packages/jax_ep next to
  # site-packages/nvidia): relative to the module only, since the wheel found
  # here may sit in a temporary build environment.
  BUILD_RPATH "${JAX_EP_NVSHMEM_LIB_DIR};\$ORIGIN/../nvidia/nvshmem/lib"
  INSTALL_RPATH "\$ORIGIN/../nvidia/nvshmem/lib")
target_compile_options(_nvshmem PRIVATE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>
  $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo>)
if(DEFINED PROJECT_VERSION AND PROJECT_VERSION)
  target_compile_definitions(_nvshmem PRIVATE JAX_EP_VERSION="${PROJECT_VERSION}")
endif()
install(TARGETS _nvshmem LIBRARY DESTINATION jax_ep)
